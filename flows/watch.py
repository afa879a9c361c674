"""The watch-base-releases flow: a new base commit on the Hub starts the quantize deployment.

    scan_hub -> trigger_quantize (one per watched repo) -> summary artifact

Runs on the cron in ``conf/watch.yaml`` through the deployment :func:`watch_deployment` builds.
A repo that fails (unreachable, rate limited, no such deployment) does not stop the others; the
flow run fails at the end with one line per failed repo naming the HTTP status.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron

from conf.watch import WatchConfig
from tasks.watch.hub_scan import scan_hub_task
from tasks.watch.hub_watch import failure_of_state, report_markdown, trigger_quantize_task

DEPLOYMENT_NAME = "watch-base-releases"


@flow(name="watch-base-releases")
def watch_base_releases(config: WatchConfig) -> dict[str, Any]:
    """Trigger one quantize run per new (repo, sha) in ``config.entries``.

    Args:
        config: the watch list; the Hub token is never a parameter (Secret block or ``HF_TOKEN``).

    Returns:
        repo -> outcome (``action`` triggered / unchanged / exported, ``sha``, ``flow_run_id``).

    Raises:
        RuntimeError: one or more repos failed (after the others were handled); one line each.
    """
    logger = get_run_logger()
    scan = scan_hub_task(config)
    failures, outcomes = list(scan.failures), []
    for candidate in scan.candidates:
        state = trigger_quantize_task(candidate, return_state=True)
        if state.is_completed():
            outcomes.append(outcome := state.result())
            logger.info("%s@%s: %s %s", outcome.repo, outcome.sha[:12], outcome.action, outcome.flow_run_id or "")
        else:
            failures.append(failure_of_state(candidate, state))
    create_markdown_artifact(key=DEPLOYMENT_NAME, markdown=report_markdown(outcomes, failures),
                             description="base releases seen and quantize runs started")
    if failures:
        raise RuntimeError(f"{len(failures)} watched repo(s) failed:\n" + "\n".join(f"  {f}" for f in failures))
    return {o.repo: o.model_dump() for o in outcomes}


def watch_deployment(config: WatchConfig) -> RunnerDeployment:
    """The ``watch-base-releases`` deployment: ``config.cron`` in ``config.timezone``, ``config`` as parameter.

    ``work_pool`` null gives a deployment for ``serve`` (no worker). One run at a time, so two
    overlapping ticks never race on the same release. The entrypoint is a module path
    (``flows.watch.watch_base_releases``), so a worker imports the installed package instead of
    copying files from the directory the deployment was created in.

    Args:
        config: the watch list (``conf.watch.load_watch``); it becomes the runs' parameter.

    Returns:
        The deployment; ``.apply()`` registers it, ``prefect.serve(...)`` also runs it.
    """
    return watch_base_releases.to_deployment(
        name=DEPLOYMENT_NAME,
        schedules=[Cron(config.cron, timezone=config.timezone)],
        parameters={"config": config.model_dump(mode="json")},
        work_pool_name=config.work_pool,
        concurrency_limit=1,
        tags=["quantdag"],
        description="Start the quantize deployment for every new base commit in conf/watch.yaml.",
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
