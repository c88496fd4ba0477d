"""The `nextserve` command line (`main.py`) and its sub-commands: `up` starts Redis, Ray, the controller and
the Serve application and waits; `status`, `scale` and `rebalance` talk to the cluster's Redis registry;
`generate`, `plan`, `make-tiny` and `bench` run in this process. Runs in the operator's shell (or a
KubeRay submitter); the only place that reads the environment."""
