//go:build tools

// Package tools pins the Kubernetes commands (control plane, kubelet and
// kube-proxy for the real test node) built by
// tools/cluster/build.sh (go build k8s.io/kubernetes/cmd/<name>).
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
