//go:build tools

// Package tools pins the Kubernetes control-plane commands built by
// tools/cluster/build.sh (go build k8s.io/kubernetes/cmd/<name>).
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
