"""`ray job submit` entrypoint for one stage of a recipe.

    ray job submit --working-dir . -- python jobs/stage.py complete jobs/configs/tiny-cpu.yaml --run-dir runs/tiny

Inside a job, Ray sets RAY_ADDRESS, so the stage runs on the cluster the job was submitted to.
"""

import sys

from zephyr_ray.cli import main

if __name__ == "__main__":
    main(["stage", *sys.argv[1:]])
