// Command etcd is the etcd server built from the go.etcd.io/etcd/server/v3
// module (same entry point as the upstream etcd binary).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
