"""The control plane: the controller actor (placement, membership, scaling, EPLB rebalancing), the Redis
registry, live resharding, the workers' admin calls, a local redis-server, and the epoch follower that
keeps a head's expert backend on the published placement. Runs in the controller actor and in head
replicas; talks to Ray and Redis."""
