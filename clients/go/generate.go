// Package sysdesign is the Go client of sysdesign: cmd/walk takes the client
// walk of clients/README.md through stubs generated from ../../protos.
//
// The stubs are not committed. Generate them into gen/ before building:
//
//	go generate ./...
//	go build -o bin/walk ./cmd/walk
package sysdesign

//go:generate go run github.com/bufbuild/buf/cmd/buf@v1.75.0 generate ../../protos --exclude-path ../../protos/buf
