-- RFC 8803 (0-RTT TCP Convert Protocol) dissector for Wireshark and tshark.
--
--   tshark -X lua_script:$(pep dissector) -r capture.pcap -Y convert
--   Wireshark: copy it into ~/.local/lib/wireshark/plugins/ (Help > About > Folders
--   shows the personal Lua plugins folder), or start wireshark -X lua_script:FILE.
--
-- What it decodes: the fixed header (Version, Total Length, Magic 0x2263) and
-- every TLV of RFC 8803 section 6: Info, Connect (port, address, TCP options),
-- Extended TCP Header (the returned TCP options), Supported TCP Extensions,
-- Cookie, Error (the code's name, and the value read as the code says: supported
-- versions, the echoed message, Missing Cookie's cookie, unsupported option
-- kinds, the suggested delay, the ICMP code). Unknown TLV types are shown raw.
-- A message is found by its header anywhere a TCP stream starts (heuristic on
-- the magic, so any port works), in the payload of a SYN (TCP Fast Open) or in
-- the first segment after the handshake; one split over segments is reassembled
-- (TCP's "Allow subdissector to reassemble TCP streams", on by default).
-- Malformed messages get expert info (Analyze > Expert Information; tshark
-- -e _ws.expert.message) naming the rule from RFC 8803 / docs/protocol.md.
-- Bytes after the message are the application's: they go to the dissector of the
-- port named in the Connect TLV (HTTP for 80, TLS for 443, ...), else to "data".
--
-- If another dissector owns the port (e.g. 1080 is SOCKS), let heuristics go
-- first: -o tcp.try_heuristic_first:TRUE, or Decode As... > CONVERT.
--
-- Filter fields live under "convert.", e.g. convert.connect.address,
-- convert.error.code == 96, convert.cookie, convert.tlv.type == 0x15.
-- Written for pepsock from RFC 8803's text; no code from other dissectors.

local convert = Proto("convert", "0-RTT TCP Convert Protocol (RFC 8803)")

local HEADER_LEN = 4
local MAGIC = 0x2263
local SUPPORTED_VERSION = 1

local TLV_INFO, TLV_CONNECT, TLV_EXT_HEADER, TLV_SUPPORTED, TLV_COOKIE, TLV_ERROR =
    0x01, 0x0A, 0x14, 0x15, 0x16, 0x1E

local tlv_names = {
    [TLV_INFO] = "Info",
    [TLV_CONNECT] = "Connect",
    [TLV_EXT_HEADER] = "Extended TCP Header",
    [TLV_SUPPORTED] = "Supported TCP Extensions",
    [TLV_COOKIE] = "Cookie",
    [TLV_ERROR] = "Error",
}

local error_names = {
    [0] = "Unsupported Version",
    [1] = "Malformed Message",
    [2] = "Unsupported Message",
    [3] = "Missing Cookie",
    [32] = "Not Authorized",
    [33] = "Unsupported TCP Option",
    [64] = "Resource Exceeded",
    [65] = "Network Failure",
    [96] = "Connection Reset",
    [97] = "Destination Unreachable",
}

local function error_class(code)
    if code < 32 then return "message validation and processing error"
    elseif code < 64 then return "client-side error"
    elseif code < 96 then return "converter-side error"
    elseif code < 128 then return "error caused by the destination"
    end
    return "unassigned range"
end

-- TCP option kinds (IANA "TCP Parameters"), for Connect, Extended TCP Header,
-- Supported TCP Extensions and Error 33
local option_names = {
    [0] = "End of Option List", [1] = "No-Operation", [2] = "Maximum Segment Size",
    [3] = "Window Scale", [4] = "SACK Permitted", [5] = "SACK", [8] = "Timestamps",
    [19] = "TCP MD5 Signature", [27] = "Quick-Start Response", [28] = "User Timeout",
    [29] = "TCP Authentication (TCP-AO)", [30] = "Multipath TCP", [34] = "TCP Fast Open Cookie",
    [69] = "Encryption Negotiation (TCP-ENO)", [172] = "Accurate ECN Order 0",
    [174] = "Accurate ECN Order 1", [253] = "Experimental (RFC 3692)",
    [254] = "Experimental (RFC 3692)",
}

-- ICMP Destination Unreachable codes (Error 97 echoes the code)
local icmp_unreach_names = {
    [0] = "Net Unreachable", [1] = "Host Unreachable", [2] = "Protocol Unreachable",
    [3] = "Port Unreachable", [4] = "Fragmentation Needed", [5] = "Source Route Failed",
    [6] = "Destination Network Unknown", [7] = "Destination Host Unknown",
    [9] = "Network Administratively Prohibited", [10] = "Host Administratively Prohibited",
    [11] = "Network Unreachable for ToS", [12] = "Host Unreachable for ToS",
    [13] = "Communication Administratively Prohibited",
}

local f = convert.fields
f.version = ProtoField.uint8("convert.version", "Version", base.DEC)
f.length = ProtoField.uint8("convert.length", "Total Length (32-bit words)", base.DEC)
f.magic = ProtoField.uint16("convert.magic", "Magic Number", base.HEX)
f.message_bytes = ProtoField.uint16("convert.message_bytes", "Message length (bytes)", base.DEC)
f.kind = ProtoField.string("convert.kind", "Message")

f.tlv = ProtoField.bytes("convert.tlv", "TLV")
f.tlv_type = ProtoField.uint8("convert.tlv.type", "Type", base.HEX, tlv_names)
f.tlv_length = ProtoField.uint8("convert.tlv.length", "Length (32-bit words)", base.DEC)
f.tlv_value = ProtoField.bytes("convert.tlv.value", "Value")
f.padding = ProtoField.bytes("convert.padding", "Padding")
f.unassigned = ProtoField.uint16("convert.unassigned", "Unassigned (zero)", base.HEX)

f.connect_port = ProtoField.uint16("convert.connect.port", "Remote Peer Port", base.DEC)
f.connect_address = ProtoField.ipv6("convert.connect.address", "Remote Peer IP Address")
f.connect_ipv4 = ProtoField.ipv4("convert.connect.ipv4", "Remote Peer IPv4 Address (IPv4-mapped)")
f.connect_options = ProtoField.uint8("convert.connect.options", "TCP options requested", base.DEC)

f.option = ProtoField.bytes("convert.option", "TCP option")
f.option_kind = ProtoField.uint8("convert.option.kind", "Kind", base.DEC, option_names)
f.option_length = ProtoField.uint8("convert.option.length", "Length", base.DEC)
f.option_value = ProtoField.bytes("convert.option.value", "Value")

f.ext_header = ProtoField.bytes("convert.ext_header", "Returned Extended TCP Header")
f.supported_kind = ProtoField.uint8("convert.supported.kind", "Supported TCP option", base.DEC,
                                    option_names)

f.cookie = ProtoField.bytes("convert.cookie", "Cookie")

f.error_code = ProtoField.uint8("convert.error.code", "Error Code", base.DEC, error_names)
f.error_value = ProtoField.bytes("convert.error.value", "Value")
f.error_version = ProtoField.uint8("convert.error.version", "Supported version", base.DEC)
f.error_echo = ProtoField.bytes("convert.error.echo", "Echoed message")
f.error_option = ProtoField.uint8("convert.error.option_kind", "Unsupported TCP option", base.DEC,
                                  option_names)
f.error_delay = ProtoField.uint32("convert.error.delay", "Suggested delay (s, 0 = at least 30)",
                                  base.DEC)
f.error_icmp_code = ProtoField.uint8("convert.error.icmp_code", "ICMP code", base.DEC,
                                     icmp_unreach_names)

local ef = {
    malformed = ProtoExpert.new("convert.malformed", "Malformed Convert message",
                                expert.group.MALFORMED, expert.severity.ERROR),
    version = ProtoExpert.new("convert.version.unsupported", "Unsupported Convert version",
                              expert.group.PROTOCOL, expert.severity.WARN),
    unknown_tlv = ProtoExpert.new("convert.tlv.unknown", "Unknown TLV type",
                                  expert.group.UNDECODED, expert.severity.WARN),
    nonzero = ProtoExpert.new("convert.nonzero", "Field that must be zero is not",
                              expert.group.PROTOCOL, expert.severity.WARN),
    error = ProtoExpert.new("convert.error", "The converter reports an error",
                            expert.group.RESPONSE_CODE, expert.severity.WARN),
    truncated = ProtoExpert.new("convert.truncated", "Convert message cut short",
                                expert.group.MALFORMED, expert.severity.ERROR),
    options = ProtoExpert.new("convert.option.unparsed", "Returned TCP header does not parse as options",
                              expert.group.PROTOCOL, expert.severity.WARN),
}
convert.experts = { ef.malformed, ef.version, ef.unknown_tlv, ef.nonzero, ef.error, ef.truncated,
                    ef.options }

local tcp_seq = Field.new("tcp.seq")

local function hexbytes(range)
    return range:bytes():tohex():lower()
end

-- TCP options as Kind, Length, Value; `strict` (Connect) refuses NOP and
-- allows kind 0 only as the start of the zero padding.
local function dissect_options(buf, off, stop, tree, strict)
    local count = 0
    -- what a Connect breaks is malformed; an odd Extended TCP Header is only reported
    local bad = strict and ef.malformed or ef.options
    while off < stop do
        local kind = buf(off, 1):uint()
        if kind == 0 then
            local pad = buf(off, stop - off)
            local item = tree:add(f.padding, pad)
            local nonzero = false
            for i = 0, pad:len() - 1 do
                if pad(i, 1):uint() ~= 0 then nonzero = true end
            end
            if strict and (nonzero or pad:len() >= 4) then
                item:add_proto_expert_info(ef.malformed,
                    "Connect: kind 0 may only start the zero padding (all zero, under 4 bytes)")
            end
            return count
        end
        if kind == 1 then
            local item = tree:add(f.option_kind, buf(off, 1))
            if strict then
                item:add_proto_expert_info(ef.malformed,
                    "Connect: NOP (kind 1) must not be in the TCP options field")
            end
            off = off + 1
        else
            if off + 2 > stop then
                tree:add_proto_expert_info(bad, "TCP option without its Length")
                return count
            end
            local len = buf(off + 1, 1):uint()
            if len < 2 or off + len > stop then
                local item = tree:add(f.option, buf(off, stop - off))
                item:add_proto_expert_info(bad,
                    string.format("TCP option kind %d: Length %d %s", kind, len,
                                  len < 2 and "is below 2" or "runs past the TLV"))
                return count
            end
            local name = option_names[kind] or "unknown"
            local opt = tree:add(f.option, buf(off, len))
            opt:set_text(string.format("TCP option: %s (%d), length %d", name, kind, len))
            opt:add(f.option_kind, buf(off, 1))
            opt:add(f.option_length, buf(off + 1, 1))
            if len > 2 then
                opt:add(f.option_value, buf(off + 2, len - 2))
            end
            count = count + 1
            off = off + len
        end
    end
    return count
end

local function check_zero16(range, tree)
    local item = tree:add(f.unassigned, range)
    if range:uint() ~= 0 then
        item:add_proto_expert_info(ef.nonzero, "Unassigned/Zero field is not zero")
    end
end

-- the Connect TLV's address rules (RFC 8803 6.2.3, docs/protocol.md)
local function address_problem(range)
    local b = {}
    for i = 0, 15 do b[i] = range(i, 1):uint() end
    local mapped = true
    for i = 0, 9 do if b[i] ~= 0 then mapped = false end end
    mapped = mapped and b[10] == 0xff and b[11] == 0xff
    if mapped then
        local a = b[12]
        if b[12] + b[13] + b[14] + b[15] == 0 then return "unspecified (0.0.0.0)" end
        if a >= 224 and a <= 239 then return "multicast" end
        if b[12] == 255 and b[13] == 255 and b[14] == 255 and b[15] == 255 then return "broadcast" end
        if a == 127 then return "loopback" end
        return nil, true
    end
    local zero = true
    for i = 0, 14 do if b[i] ~= 0 then zero = false end end
    if zero and b[15] == 0 then return "unspecified (::)" end
    if zero and b[15] == 1 then return "loopback (::1)" end
    if b[0] == 0xff then return "multicast" end
    return nil, false
end

local function dissect_connect(buf, off, stop, tree, summary)
    if stop - off < 20 then
        tree:add_proto_expert_info(ef.malformed, "Connect: Length must be at least 5 (20 bytes)")
        return nil
    end
    local port_item = tree:add(f.connect_port, buf(off + 2, 2))
    local port = buf(off + 2, 2):uint()
    if port == 0 then
        port_item:add_proto_expert_info(ef.malformed, "Connect: port 0")
    end
    local addr = buf(off + 4, 16)
    local addr_item = tree:add(f.connect_address, addr)
    local problem, mapped = address_problem(addr)
    local text
    if mapped then
        tree:add(f.connect_ipv4, buf(off + 16, 4))
        text = string.format("%s:%d", tostring(buf(off + 16, 4):ipv4()), port)
    else
        text = string.format("[%s]:%d", tostring(addr:ipv6()), port)
    end
    if problem then
        addr_item:add_proto_expert_info(ef.malformed, "Connect: address is " .. problem)
    end
    local nopts = 0
    if stop > off + 20 then
        nopts = dissect_options(buf, off + 20, stop, tree, true)
    end
    tree:add(f.connect_options, nopts):set_generated()
    tree:append_text(": " .. text .. (nopts > 0 and string.format(" (+%d TCP options)", nopts) or ""))
    table.insert(summary, "Connect " .. text)
    return port
end

local function dissect_error(buf, off, stop, tree, summary)
    local code = buf(off + 2, 1):uint()
    local name = error_names[code] or "unknown"
    local code_item = tree:add(f.error_code, buf(off + 2, 1))
    code_item:append_text(" (" .. error_class(code) .. ")")
    tree:append_text(string.format(": %d %s", code, name))
    code_item:add_proto_expert_info(ef.error, string.format("Error %d: %s", code, name))
    table.insert(summary, string.format("Error %d %s", code, name))
    local voff, vlen = off + 3, stop - off - 3
    if vlen <= 0 then return end
    local value = buf(voff, vlen)
    if code == 0 then
        for i = 0, vlen - 1 do
            local v = buf(voff + i, 1):uint()
            if v == 0 then break end
            tree:add(f.error_version, buf(voff + i, 1))
        end
    elseif code == 1 or code == 2 then
        -- the received message, shifted by one byte to keep its alignment
        if vlen > 1 then
            tree:add(f.error_echo, buf(voff + 1, vlen - 1))
        else
            tree:add(f.error_value, value)
        end
    elseif code == 3 then
        local first = buf(voff, 1)
        if first:uint() ~= 0 then
            tree:add(f.error_value, first):add_proto_expert_info(ef.nonzero,
                "Missing Cookie: the value's first byte must be 0")
        end
        if vlen > 1 then
            local cookie = buf(voff + 1, vlen - 1)
            tree:add(f.cookie, cookie)
            summary[#summary] = summary[#summary] .. " (cookie " .. hexbytes(cookie) .. ")"
        end
    elseif code == 33 then
        for i = 0, vlen - 1 do
            if buf(voff + i, 1):uint() == 0 then break end
            tree:add(f.error_option, buf(voff + i, 1))
        end
    elseif code == 64 or code == 65 then
        local n = math.min(vlen, 4)
        -- one byte in a one-word TLV; longer values are read as one big-endian number
        local first_nonzero = voff
        if vlen > 4 then first_nonzero = voff + vlen - 4 end
        tree:add(f.error_delay, buf(first_nonzero, n))
    elseif code == 97 then
        tree:add(f.error_icmp_code, buf(voff, 1))
        if vlen > 1 then tree:add(f.padding, buf(voff + 1, vlen - 1)) end
    else
        tree:add(f.error_value, value)
    end
end

-- One TLV at buf[off, stop); returns its type.
local function dissect_tlv(buf, off, stop, tree, summary, ctx)
    local ttype = buf(off, 1):uint()
    local name = tlv_names[ttype] or "Unknown"
    local t = tree:add(f.tlv, buf(off, stop - off))
    t:set_text(string.format("%s TLV (0x%02x)", name, ttype))
    t:add(f.tlv_type, buf(off, 1))
    t:add(f.tlv_length, buf(off + 1, 1))
    local vlen = stop - off - 2
    if ttype == TLV_INFO then
        if stop - off ~= 4 then
            t:add_proto_expert_info(ef.malformed, "Info: Length must be 1")
        end
        if vlen >= 2 then check_zero16(buf(off + 2, 2), t) end
        table.insert(summary, "Info")
    elseif ttype == TLV_CONNECT then
        ctx.port = dissect_connect(buf, off, stop, t, summary)
    elseif ttype == TLV_EXT_HEADER then
        check_zero16(buf(off + 2, 2), t)
        if vlen > 2 then
            local hdr = t:add(f.ext_header, buf(off + 4, vlen - 2))
            dissect_options(buf, off + 4, stop, hdr, false)
        end
        table.insert(summary, "Extended TCP Header")
    elseif ttype == TLV_SUPPORTED then
        check_zero16(buf(off + 2, 2), t)
        local kinds, ended = {}, false
        for i = off + 4, stop - 1 do
            local k = buf(i, 1):uint()
            if k == 0 then
                ended = true
            elseif ended then
                t:add_proto_expert_info(ef.malformed,
                    "Supported TCP Extensions: a zero before a non-zero kind")
                break
            else
                t:add(f.supported_kind, buf(i, 1))
                table.insert(kinds, tostring(k))
            end
        end
        t:append_text(": " .. (#kinds > 0 and table.concat(kinds, ", ") or "none"))
        table.insert(summary, "Supported TCP Extensions " .. table.concat(kinds, ","))
    elseif ttype == TLV_COOKIE then
        check_zero16(buf(off + 2, 2), t)
        if vlen > 2 then
            local cookie = buf(off + 4, vlen - 2)
            t:add(f.cookie, cookie)
            t:append_text(": " .. hexbytes(cookie))
        end
        table.insert(summary, "Cookie")
    elseif ttype == TLV_ERROR then
        dissect_error(buf, off, stop, t, summary)
    else
        if vlen > 0 then t:add(f.tlv_value, buf(off + 2, vlen)) end
        t:add_proto_expert_info(ef.unknown_tlv, string.format("Unknown TLV type %d", ttype))
        table.insert(summary, string.format("TLV 0x%02x", ttype))
    end
    return ttype
end

-- Does a Convert message start here? Returns the byte length its header
-- declares (0 for a malformed Total Length of 0), NEED_MORE if the segment
-- holds too little of a header to tell (only at a stream's start), or nil.
local NEED_MORE = -1
local function message_length(buf)
    local have = buf:len()
    local at_start = true
    local seq = tcp_seq()
    if seq ~= nil and seq.value > 1 then at_start = false end
    if have < HEADER_LEN then
        -- a header split before its magic: only worth waiting for at the stream's start
        if not at_start or have < 1 or buf(0, 1):uint() ~= SUPPORTED_VERSION then return nil end
        if have >= 3 and buf(2, 1):uint() ~= 0x22 then return nil end
        if have >= 2 and buf(1, 1):uint() == 0 then return nil end
        return NEED_MORE
    end
    if buf(2, 2):uint() ~= MAGIC then return nil end
    return buf(1, 1):uint() * 4
end

local data_dissector = Dissector.get("data")
local tcp_stream = Field.new("tcp.stream")

-- Per TCP stream, filled as frames are dissected in order (and kept for revisits):
local message_end = {}   -- "stream:srcport" -> frame that completed that direction's message
local app_port = {}      -- stream -> the Connect TLV's port: who gets the bytes after

local function stream_key(pinfo)
    local s = tcp_stream()
    if s == nil then return nil, nil end
    return tostring(s.value) .. ":" .. tostring(pinfo.src_port), s.value
end

-- The application's bytes (after the messages): the dissector of the port the
-- client asked the converter for (80 -> HTTP, 443 -> TLS, ...), else raw data.
-- Not TCP's heuristics: one that matches (HTTP's does on a request) claims the
-- connection from that frame on, and the converter's reply, which comes after
-- the client's first bytes in 0-RTT, would no longer reach this dissector.
local function handoff(tvb, pinfo, tree, stream)
    local port = stream and app_port[stream]
    local d = port and DissectorTable.get("tcp.port"):get_dissector(port)
    if d ~= nil then
        d:call(tvb, pinfo, tree)
    else
        data_dissector:call(tvb, pinfo, tree)
    end
end

local function dissect(buf, pinfo, tree)
    local have = buf:len()
    local total = message_length(buf)
    if total == nil then return 0 end
    if total == NEED_MORE then
        pinfo.desegment_offset = 0
        pinfo.desegment_len = DESEGMENT_ONE_MORE_SEGMENT
        return have
    end
    if total > have and total >= HEADER_LEN then
        if pinfo.can_desegment > 0 then
            pinfo.desegment_offset = 0
            pinfo.desegment_len = total - have
            return have
        end
    end

    pinfo.cols.protocol = "Convert"
    local shown = math.min(math.max(total, HEADER_LEN), have)
    local root = tree:add(convert, buf(0, shown))
    local version = buf(0, 1):uint()
    local vitem = root:add(f.version, buf(0, 1))
    if version ~= SUPPORTED_VERSION then
        vitem:add_proto_expert_info(ef.version,
            string.format("Version %d (RFC 8803 defines version 1)", version))
    end
    local litem = root:add(f.length, buf(1, 1))
    root:add(f.magic, buf(2, 2))
    root:add(f.message_bytes, total):set_generated()
    local summary, ctx = {}, {}
    if total == 0 then
        litem:add_proto_expert_info(ef.malformed, "Total Length 0 (at least 1: the header)")
        total = HEADER_LEN
    end
    if total > have then
        root:add_proto_expert_info(ef.truncated, string.format(
            "Total Length says %d bytes, %d captured (reassembly off or capture ended)", total, have))
    end
    local stop = math.min(total, have)
    local off, seen = HEADER_LEN, {}
    while off < stop do
        local ttype = buf(off, 1):uint()
        local words = off + 1 < stop and buf(off + 1, 1):uint() or 0
        if ttype == 0 then
            root:add(f.tlv_type, buf(off, 1)):add_proto_expert_info(ef.malformed,
                "TLV type 0 is reserved")
            ctx.malformed = true
            break
        end
        if words == 0 then
            root:add(f.tlv_length, buf(off + 1 < stop and off + 1 or off, 1))
                :add_proto_expert_info(ef.malformed, string.format("TLV %d with Length 0", ttype))
            ctx.malformed = true
            break
        end
        local tend = off + 4 * words
        if tend > total then
            root:add(f.tlv, buf(off, stop - off)):add_proto_expert_info(ef.malformed,
                string.format("TLV %d runs past the message (Length %d)", ttype, words))
            ctx.malformed = true
            break
        end
        if tend > stop then break end   -- truncated capture, reported above
        local t = dissect_tlv(buf, off, tend, root, summary, ctx)
        if seen[t] then
            root:add_proto_expert_info(ef.malformed, string.format("TLV %d appears twice", t))
            ctx.malformed = true
        end
        seen[t] = true
        off = tend
    end

    local kind
    if seen[TLV_CONNECT] or seen[TLV_INFO] then
        kind = "request"
    elseif seen[TLV_ERROR] then
        kind = "error reply"
    elseif ctx.malformed then
        kind = "malformed message"
    else
        kind = "reply"
    end
    root:add(f.kind, kind):set_generated()
    local text = kind .. (#summary > 0 and (": " .. table.concat(summary, ", ")) or "")
    root:append_text(", " .. text)
    pinfo.cols.info:set("Convert " .. text)
    local key, stream = stream_key(pinfo)
    if key ~= nil then
        message_end[key] = message_end[key] or pinfo.number
        if ctx.port ~= nil then app_port[stream] = ctx.port end
    end
    if have > total then
        -- what follows is the application's byte stream
        handoff(buf(total):tvb(), pinfo, tree, stream)
    end
    return have
end

-- The conversation's dissector (set by the heuristic below): one Convert
-- message at the start of each direction, the application's bytes after it.
function convert.dissector(buf, pinfo, tree)
    local key, stream = stream_key(pinfo)
    local ended = key and message_end[key]
    if ended and pinfo.number > ended then
        handoff(buf, pinfo, tree, stream)
        return buf:len()
    end
    if message_length(buf) == nil then
        -- this direction does not start with a Convert message: all of it is the application's
        if key ~= nil and not ended then message_end[key] = pinfo.number - 1 end
        handoff(buf, pinfo, tree, stream)
        return buf:len()
    end
    return dissect(buf, pinfo, tree)
end

local function heuristic(buf, pinfo, tree)
    if message_length(buf) == nil then return false end
    local key = stream_key(pinfo)
    if key ~= nil and message_end[key] and pinfo.number > message_end[key] then return false end
    -- the rest of this connection (the other direction's reply too) comes to us first
    pinfo.conversation = convert
    dissect(buf, pinfo, tree)
    return true
end

convert:register_heuristic("tcp", heuristic)
DissectorTable.get("tcp.port"):add_for_decode_as(convert)
