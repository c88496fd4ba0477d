"""The Serve application's arguments: validation, and the Redis password and admin token taken from the
environment."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from pydantic import ValidationError

from nextserve.cluster.app_args import AppArgs


def test_password_from_the_named_variable_goes_into_the_url(tiny_dir: Path) -> None:
    args = AppArgs(model=str(tiny_dir), redis_url="redis://redis:6379/1", redis_password_env="PW")
    resolved = args.with_redis_password({"PW": "s3cr:t/@x"})
    assert resolved.redis_password_env is None
    pool = redis.ConnectionPool.from_url(resolved.redis_url)
    assert pool.connection_kwargs["password"] == "s3cr:t/@x" and pool.connection_kwargs["db"] == 1
    assert AppArgs(model=str(tiny_dir), redis_url="redis://r:1/0").with_redis_password({}).redis_url == "redis://r:1/0"


def test_missing_password_or_double_credentials_are_clear_errors(tiny_dir: Path) -> None:
    args = AppArgs(model=str(tiny_dir), redis_url="redis://redis:6379/1", redis_password_env="PW")
    with pytest.raises(ValueError, match="'PW' is not set"):
        args.with_redis_password({})
    with_creds = AppArgs(model=str(tiny_dir), redis_url="redis://:x@redis:6379/1", redis_password_env="PW")
    with pytest.raises(ValueError, match="carries credentials"):
        with_creds.with_redis_password({"PW": "y"})


@pytest.mark.parametrize("field, value", [("model", "/nope"), ("expert_workers", 0), ("dtype", "float16"),
                                          ("surprise", 1)])
def test_bad_arguments_name_the_field(tiny_dir: Path, field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        AppArgs(**{"model": str(tiny_dir), field: value})


def test_scheduler_fields_that_clash_fail_at_validation_naming_both(tiny_dir: Path) -> None:
    """Before a head replica starts (Serve would restart it forever), not inside it."""
    with pytest.raises(ValidationError, match=r"max_tokens_per_step \(512\) must be >= max_num_seqs \(700\)"):
        AppArgs(model=str(tiny_dir), max_num_seqs=700)
    args = AppArgs(model=str(tiny_dir), max_num_seqs=700, max_tokens_per_step=700, micro_batches=2)
    assert (args.scheduler_config().max_num_seqs, args.scheduler_config().micro_batches) == (700, 2)
    auto = AppArgs(model=str(tiny_dir))  # the default: each head chooses from the devices
    assert auto.micro_batches == "auto"
    assert [auto.scheduler_config(head, experts).micro_batches
            for head, experts in [(False, False), (True, False), (False, True), (True, True)]] == [1, 1, 1, 2]
    assert args.scheduler_config(True, True).micro_batches == 2 and \
        AppArgs(model=str(tiny_dir), micro_batches=1).scheduler_config(True, True).micro_batches == 1
    with pytest.raises(ValueError, match="micro_batches"):
        AppArgs(model=str(tiny_dir), micro_batches=0)


def test_admin_token_from_the_named_variable(tiny_dir: Path) -> None:
    args = AppArgs(model=str(tiny_dir), admin_token_env="TOKEN_VAR")
    resolved = args.with_admin_token({"TOKEN_VAR": "t0ken"})
    assert resolved.admin_token == "t0ken" and resolved.admin_token_env is None
    assert "t0ken" not in repr(resolved)  # args get logged
    given = AppArgs(model=str(tiny_dir), admin_token="given")
    assert given.with_admin_token({}).admin_token == "given"


def test_a_cluster_without_an_admin_token_is_a_clear_error(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="no admin token for the expert workers: set admin_token_env"):
        AppArgs(model=str(tiny_dir)).with_admin_token({})
    with pytest.raises(ValueError, match="admin_token_env='TOKEN_VAR' is not set"):
        AppArgs(model=str(tiny_dir), admin_token_env="TOKEN_VAR").with_admin_token({"TOKEN_VAR": ""})
    with pytest.raises(ValidationError, match="admin_token and admin_token_env are both set"):
        AppArgs(model=str(tiny_dir), admin_token="x", admin_token_env="TOKEN_VAR")
    with pytest.raises(ValidationError, match="admin_token"):
        AppArgs(model=str(tiny_dir), admin_token="")


def test_more_replicas_than_workers_fails_naming_both(tiny_dir: Path) -> None:
    with pytest.raises(ValidationError, match="expert_replicas=3 exceeds expert_workers=2"):
        AppArgs(model=str(tiny_dir), expert_workers=2, expert_replicas=3)
    assert AppArgs(model=str(tiny_dir), expert_workers=3, expert_replicas=3).expert_replicas == 3


def test_max_model_len_defaults_to_the_model_and_may_not_exceed_it(tiny_dir: Path) -> None:
    assert AppArgs(model=str(tiny_dir)).context_length() == 65536
    assert AppArgs(model=str(tiny_dir), max_model_len=32768).context_length() == 32768
    with pytest.raises(ValidationError, match="max_model_len=70000 exceeds the model's context of 65536"):
        AppArgs(model=str(tiny_dir), max_model_len=70000)


def test_speculative_config_is_json_validated_at_construction(tiny_dir: Path) -> None:
    doc = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'
    spec = AppArgs(model=str(tiny_dir), speculative_config=doc).speculative()
    assert spec is not None and (spec.num_speculative_tokens, spec.prompt_lookup_max) == (4, 3)
    assert AppArgs(model=str(tiny_dir)).speculative() is None
    with pytest.raises(ValidationError, match="num_speculative_tokens"):
        AppArgs(model=str(tiny_dir), speculative_config='{"method": "ngram"}')


def test_autoscaling_ranges_become_serve_and_controller_settings(tiny_dir: Path) -> None:
    args = AppArgs(model=str(tiny_dir), autoscale_heads="1:3", autoscale_expert_workers="2:4", max_num_seqs=8,
                   autoscale_busy_high=0.5, autoscale_downscale_delay_s=12)
    assert args.head_autoscaling() == {"min_replicas": 1, "max_replicas": 3, "initial_replicas": 1,
                                       "target_ongoing_requests": 8, "upscale_delay_s": 10.0,
                                       "downscale_delay_s": 12.0, "look_back_period_s": 15.0}
    workers = args.worker_autoscaling()
    assert workers is not None and (workers.range.minimum, workers.range.maximum) == (2, 4)
    assert (workers.busy_high, workers.downscale_delay_s, workers.expert_replicas) == (0.5, 12.0, 1)
    assert args.min_head_replicas() == 1
    fixed = AppArgs(model=str(tiny_dir), head_replicas=2)
    assert fixed.head_autoscaling() is None and fixed.worker_autoscaling() is None and fixed.min_head_replicas() == 2


@pytest.mark.parametrize("fields, message", [
    ({"autoscale_heads": "2:3"}, "head_replicas=1 is outside autoscale_heads=2:3"),
    ({"autoscale_expert_workers": "3:4"}, "expert_workers=2 is outside autoscale_expert_workers=3:4"),
    ({"autoscale_expert_workers": "1:3", "expert_replicas": 2}, "goes below expert_replicas=2"),
    ({"autoscale_heads": "two"}, "is not MIN:MAX"),
    ({"autoscale_expert_workers": "2:3", "autoscale_busy_low": 0.7}, "busy_low=0.7 and busy_high=0.6"),
])
def test_autoscaling_ranges_that_cannot_hold_the_cluster_are_refused(tiny_dir: Path, fields: dict,
                                                                      message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AppArgs(model=str(tiny_dir), **fields)
