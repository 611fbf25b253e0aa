"""Where a Ray worker starts for a command that joins a cluster: in the command's directory, where its node has it.

Ray starts a node's workers in the directory that node's Ray was started in. On a cluster `ray start` began
elsewhere, a recipe's relative paths (``./artifacts/tiny-models/teacher``), which the command checked in its own
directory, would be looked up in another one by the engines and their preprocessing. This module is the workers'
setup hook, kept free of the package's heavier imports: every worker of such a command imports it as it starts.
Ray Train moves its workers into its own directory after this hook, so training stages hand them absolute paths
(``engines.local_path_or_hub_id``).
"""

from __future__ import annotations

import os

DRIVER_DIRECTORY_ENV = "ZEPHYR_RAY_DRIVER_DIRECTORY"


def enter_driver_directory() -> None:
    """Ray's ``worker_process_setup_hook``: enter the driver's directory if this node has it."""
    directory = os.environ.get(DRIVER_DIRECTORY_ENV)
    if directory and os.path.isdir(directory):
        os.chdir(directory)


def workers_in_this_directory() -> dict:
    """The runtime_env of a driver that joins a cluster from outside a Ray job: its workers start in its directory.
    Empty inside a job, whose driver and workers Ray runs in the job's working directory already."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    if RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ:
        return {}
    return {"env_vars": {DRIVER_DIRECTORY_ENV: os.getcwd()},
            "worker_process_setup_hook": f"{__name__}.{enter_driver_directory.__name__}"}
