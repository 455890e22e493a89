"""Network-namespace testbed: hosts, links, shaping and the evaluation experiments."""
