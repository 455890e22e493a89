// A tiny Go HTTP client for the `pep run` tests (stdlib only): GET each URL
// given, write the last body to stdout.  Go makes its own syscalls, so
// libpep.so cannot enter it; built with CGO_ENABLED=0 it is static too.
// "-s" instead of URLs: print "pid N", then report SIGHUP ("HUP") and exit 7
// on SIGTERM ("TERM").
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func signals() {
	ch := make(chan os.Signal, 4)
	signal.Notify(ch, syscall.SIGHUP, syscall.SIGTERM)
	fmt.Printf("pid %d\n", os.Getpid())
	timeout := time.After(60 * time.Second)
	for {
		select {
		case s := <-ch:
			if s == syscall.SIGHUP {
				fmt.Println("HUP")
			} else {
				fmt.Println("TERM")
				os.Exit(7)
			}
		case <-timeout:
			os.Exit(1)
		}
	}
}

func main() {
	if len(os.Args) == 2 && os.Args[1] == "-s" {
		signals()
	}
	client := &http.Client{Timeout: 20 * time.Second,
		Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}
	var body []byte
	for _, url := range os.Args[1:] {
		resp, err := client.Get(url)
		if err != nil {
			fmt.Fprintln(os.Stderr, "goget:", err)
			os.Exit(1)
		}
		body, err = io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 {
			fmt.Fprintln(os.Stderr, "goget:", resp.Status, err)
			os.Exit(1)
		}
	}
	os.Stdout.Write(body)
}
