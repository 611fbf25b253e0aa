"""`ray job submit` entrypoint for a whole recipe (every stage in order; finished ones are skipped).

    ray job submit --working-dir . -- python jobs/run.py jobs/configs/tiny-cpu.yaml --run-dir runs/tiny

Inside a job, Ray sets RAY_ADDRESS, so the stages run on the cluster the job was submitted to.
"""

import sys

from zephyr_ray.cli import main

if __name__ == "__main__":
    main(["run", *sys.argv[1:]])
