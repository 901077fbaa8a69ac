#!/usr/bin/env bash
# The committed tree (HEAD) packed for a GPU call: .snap/code.tgz + .snap/SHA (carry ".snap" with ".whl").
# scripts/gpu_run.sh then runs from it, not from the copied working tree, which also carries whatever is
# uncommitted here (other work in progress), and it tags every row with the packed commit.
# usage: scripts/gpu_snapshot.sh [RESULTS_RUN_DIR ...]   (run dirs to carry too, e.g. a sweep to bench.resume)
set -eu
cd "$(git rev-parse --show-toplevel)"
mkdir -p .snap
git archive HEAD -- optkit conf suites scripts tests examples pyproject.toml Makefile README.md "$@" | gzip >.snap/code.tgz
git rev-parse HEAD >.snap/SHA
echo "packed $(cut -c1-7 .snap/SHA) ($(du -h .snap/code.tgz | cut -f1)); uncommitted changes stay here:"
git status --short -- optkit conf suites scripts tests examples | head -5
