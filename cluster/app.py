"""The Serve application: HTTP -> gateway (OpenAI API) -> head replicas -> expert workers (gRPC).

`build_app(args)` is the `import_path` target of a Serve config (`nextserve.cluster.app:build_app`, with
`args` as in cluster/app_args.py); `nextserve up` calls it too. The head replicas ask the controller
(a detached actor) for the expert workers when they start, so the app needs nothing else running.
"""

from __future__ import annotations

import os
from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from nextserve.cluster.app_args import AppArgs
from nextserve.cluster.deployments.gateway import GatewayDeployment
from nextserve.cluster.deployments.head import HEAD_MAX_ONGOING_REQUESTS, HEAD_MAX_QUEUED_REQUESTS, HeadDeployment
from nextserve.cluster.deployments.prefix_router import PrefixAffinityRouter


def build_app(args: dict[str, Any]) -> Application:
    app_args = AppArgs(**args).with_redis_password(os.environ).with_admin_token(os.environ)  # the one env read
    options: dict[str, Any] = {
                               # the engine refuses past its queue (429); Serve's queue in front of the heads
                               # (requests not yet handed to a replica) is bounded too
                               "max_ongoing_requests": max(HEAD_MAX_ONGOING_REQUESTS,
                                                           app_args.max_num_seqs + app_args.max_queued_requests),
                               "max_queued_requests": HEAD_MAX_QUEUED_REQUESTS,
                               # a conversation keeps landing on the head that holds its prefix cache
                               "request_router_config": RequestRouterConfig(request_router_class=PrefixAffinityRouter)}
    autoscaling = app_args.head_autoscaling()
    if autoscaling is None:
        options["num_replicas"] = app_args.head_replicas
    else:  # Serve adds and removes head replicas on their ongoing requests (AppArgs.head_autoscaling)
        options["autoscaling_config"] = autoscaling
    if app_args.head_num_gpus:
        options["ray_actor_options"] = {**HeadDeployment.ray_actor_options, "num_gpus": app_args.head_num_gpus}
    heads = HeadDeployment.options(**options).bind(app_args)
    return GatewayDeployment.bind(heads, app_args)
