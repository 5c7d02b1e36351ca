// netcheck is the e2e test workload: a static binary with no dependencies, packaged as an
// image by tests/e2e so the cluster needs no registry.
//
//	netcheck serve            HTTP on :8080, answers with the pod's hostname
//	netcheck get URL          GET URL, print the body, exit 1 unless 200
//	netcheck lookup NAME      resolve NAME through the pod's resolv.conf (CoreDNS)
//	netcheck probe URL        GET URL once a second, forever: one line per request,
//	                          "ok <unix seconds> <body>" or "FAIL <unix seconds> <error>"
//	netcheck webhook CERT KEY a validating admission webhook on :8443 (TLS from CERT/KEY):
//	                          denies objects labelled kubelab.io/deny=true, admits the rest
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"
)

// admissionReview is the part of admission.k8s.io/v1 AdmissionReview the webhook needs.
type admissionReview struct {
	APIVersion string             `json:"apiVersion"`
	Kind       string             `json:"kind"`
	Request    *admissionRequest  `json:"request,omitempty"`
	Response   *admissionResponse `json:"response,omitempty"`
}

type admissionRequest struct {
	UID    string `json:"uid"`
	Object struct {
		Metadata struct {
			Name   string            `json:"name"`
			Labels map[string]string `json:"labels"`
		} `json:"metadata"`
	} `json:"object"`
}

type admissionResponse struct {
	UID     string         `json:"uid"`
	Allowed bool           `json:"allowed"`
	Status  map[string]any `json:"status,omitempty"`
}

func validate(w http.ResponseWriter, r *http.Request) {
	var review admissionReview
	if err := json.NewDecoder(r.Body).Decode(&review); err != nil || review.Request == nil {
		http.Error(w, "not an AdmissionReview", http.StatusBadRequest)
		return
	}
	meta := review.Request.Object.Metadata
	resp := &admissionResponse{UID: review.Request.UID, Allowed: meta.Labels["kubelab.io/deny"] != "true"}
	if !resp.Allowed {
		resp.Status = map[string]any{"code": 403, "message": fmt.Sprintf("netcheck webhook denies %s: labelled kubelab.io/deny=true", meta.Name)}
	}
	fmt.Printf("review %s %s: allowed=%v\n", review.Request.UID, meta.Name, resp.Allowed)
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(admissionReview{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview", Response: resp})
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: netcheck serve | get URL | lookup NAME | probe URL | webhook CERT KEY")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "serve":
		host, _ := os.Hostname()
		http.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintf(w, "hello from %s\n", host) })
		if err := http.ListenAndServe(":8080", nil); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	case "get":
		client := http.Client{Timeout: 10 * time.Second}
		resp, err := client.Get(os.Args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		fmt.Print(string(body))
		if resp.StatusCode != http.StatusOK {
			os.Exit(1)
		}
	case "probe":
		// A fresh connection per request (no keep-alive), so each one goes through the
		// Service's rules as a new client's would. A request fails on an error or after 10 s
		// without an answer; a slower answer than usual is logged with its time (ms=), since
		// an emulated node whose host is busy can stall for seconds without losing anything.
		client := http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
		for tick := time.NewTicker(time.Second); ; <-tick.C {
			start := time.Now()
			now := start.Unix()
			resp, err := client.Get(os.Args[2])
			if err != nil {
				fmt.Printf("FAIL %d %v\n", now, err)
				continue
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				fmt.Printf("FAIL %d status %d\n", now, resp.StatusCode)
				continue
			}
			fmt.Printf("ok %d ms=%d %s", now, time.Since(start).Milliseconds(), body)
		}
	case "webhook":
		mux := http.NewServeMux()
		mux.HandleFunc("/validate", validate)
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
		srv := &http.Server{Addr: ":8443", Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		if err := srv.ListenAndServeTLS(os.Args[2], os.Args[3]); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	case "lookup":
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		addrs, err := net.DefaultResolver.LookupHost(ctx, os.Args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Println(addrs)
	default:
		os.Exit(2)
	}
}
