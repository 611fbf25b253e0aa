"""`ray job submit` entrypoint for a whole recipe (every stage in order; finished ones are skipped).

    ray job submit --working-dir . -- python jobs/run.py "$PWD/runs/tiny-cpu/recipe.yaml" --run-dir "$PWD/runs/tiny-cpu"

Paths absolute (as in the README): a job runs in Ray's copy of the working directory, without what .gitignore
lists (runs/, artifacts/), so a relative --run-dir would write into that copy.
Inside a job, Ray sets RAY_ADDRESS, so the stages run on the cluster the job was submitted to.
"""

import sys

from zephyr_ray.cli import main

if __name__ == "__main__":
    main(["run", *sys.argv[1:]])
