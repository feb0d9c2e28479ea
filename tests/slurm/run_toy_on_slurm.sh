#!/usr/bin/env bash
# The toy DAG under a real (local, one-node) SLURM cluster, through profiles/slurm:
#
#   tests/slurm/run_toy_on_slurm.sh [WORKDIR]
#
# 1. installs SLURM, slurmdbd, munge and MariaDB if missing (Debian/Ubuntu, root) and starts the local
#    cluster (tests/slurm/setup_local_slurm.sh);
# 2. copies the workflow into WORKDIR (default: a new temporary directory) and runs
#      snakemake --profile profiles/slurm --configfile config.yaml config.toy.yaml [OVERLAY] results/headline.md
#    with SBATCH_PARTITION / SBATCH_ACCOUNT set, as a cluster user would (every step but the
#    `localrule`s becomes an sbatch job). SLURM_TEST_OVERLAY=<file> adds a config overlay (tests/test_slurm.py
#    passes tests/slurm/config.slurm-test.yaml: the same DAG with less work in each job);
# 3. derives the expected jobs from the DAG itself (the dry run's job count per rule, taken before the run)
#    and checks with sacct that every job the run submitted is COMPLETED, in that partition and account;
#    that each rule finished as many jobs as the DAG has (Snakemake's "Finished jobid: N (Rule: <rule>)"), as
#    SLURM jobs or on the submit host (the `localrule`s); that the heavy rules ran as SLURM jobs and `report`
#    did not. Writes
#    WORKDIR/sacct.txt (the table) and WORKDIR/slurm_run.json (wall time, job counts per rule);
# 4. stops the daemons it started (set KEEP_SLURM=1 to leave the cluster up for a look around).
#
# Exit status 0 only if all of that holds. About 8 minutes on 2 cores with the test overlay, 15-25 without.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SETUP=$ROOT/tests/slurm/setup_local_slurm.sh
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
WORKDIR=${1:-$(mktemp -d /tmp/searchr1-toy-slurm.XXXXXX)}
PARTITION=cpu
ACCOUNT=searchr1

log() { echo "[toy-on-slurm] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ -x $PYTHON ]] || die "no Python at $PYTHON (set PYTHON=...)"
command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null \
    || "$SETUP" install

cleanup() {
    if [[ ${KEEP_SLURM:-0} == 1 ]]; then
        log "KEEP_SLURM=1: the cluster stays up; stop it with: $SETUP stop"
    else
        "$SETUP" stop
    fi
}
trap cleanup EXIT
"$SETUP" start
eval "$("$SETUP" env)"  # SLURM_CONF for the clients below

# A fresh copy of the workflow, as tests/test_toy_e2e.py makes one: no state from other runs.
mkdir -p "$WORKDIR"
cp "$ROOT"/{Snakefile,config.yaml,config.toy.yaml} "$WORKDIR"/
CONFIGS=(config.yaml config.toy.yaml)
if [[ -n ${SLURM_TEST_OVERLAY:-} ]]; then
    cp "$SLURM_TEST_OVERLAY" "$WORKDIR/config.overlay.yaml"
    CONFIGS+=(config.overlay.yaml)
fi
for dir in rules scripts envs profiles docs searchr1; do
    rm -rf "${WORKDIR:?}/$dir"
    cp -r "$ROOT/$dir" "$WORKDIR/$dir"
done
find "$WORKDIR" -name __pycache__ -prune -exec rm -rf {} +
cd "$WORKDIR"
export PYTHONPATH=$WORKDIR${PYTHONPATH:+:$PYTHONPATH}  # the jobs import the copied package
log "workflow copied to $WORKDIR"

# The expected jobs, from the DAG: the dry run's "Job stats" table (rule, count) for the same target and configs.
"$PYTHON" -m snakemake -n --quiet rules --profile profiles/slurm --configfile "${CONFIGS[@]}" -- results/headline.md \
    >dryrun.out 2>&1 || die "the dry run failed: $(tail -n 20 dryrun.out)"
declare -A dag_jobs=()
while read -r rule n; do dag_jobs[$rule]=$n; done < <(
    awk '/^Job stats:/ {table = 1; n = 0; next} table && /^total/ {table = 0} table && ++n > 2 {print $1, $2}' \
        dryrun.out
)
((${#dag_jobs[@]} > 0)) || die "no job counts in the dry run's output ($WORKDIR/dryrun.out)"
log "the DAG: $(for r in "${!dag_jobs[@]}"; do printf '%s=%s ' "$r" "${dag_jobs[$r]}"; done)"

# sacct's window: jobs that started from now on. (Whole seconds; sacct has no finer resolution.)
START=$(date +%Y-%m-%dT%H:%M:%S)
SECONDS=0
set +e
# The first status check after a submission comes after 10 s, not the plugin's 40 s default: the toy's
# jobs are short, and a real cluster's scheduler would not notice the extra queries of one test run.
SBATCH_PARTITION=$PARTITION SBATCH_ACCOUNT=$ACCOUNT \
    "$PYTHON" -m snakemake --profile profiles/slurm --configfile "${CONFIGS[@]}" \
    --slurm-init-seconds-before-status-checks 10 -- results/headline.md 2>&1 | tee snakemake.out
rc=${PIPESTATUS[0]}
set -e
WALL=$SECONDS
log "snakemake exited with $rc after ${WALL} s"

# Let slurmdbd catch up with the last job's end record before asking it.
sleep 3
FIELDS=JobID,JobName%36,Comment%44,Partition,Account,AllocCPUS,ReqMem,Elapsed,State,ExitCode
sacct -X -S "$START" -o "$FIELDS" | tee sacct.txt
# The SLURM job ids this run submitted, from the plugin's "Job N has been submitted with SLURM jobid M".
mapfile -t submitted < <(grep -oE 'submitted with SLURM jobid [0-9]+' snakemake.out | awk '{print $NF}')
mapfile -t rows < <(sacct -X -n -P -S "$START" -o JobID,Comment,Partition,Account,State)
bad=()
rules=()
for row in "${rows[@]}"; do
    IFS='|' read -r jobid comment partition account state <<<"$row"
    rules+=("${comment%%_wildcards_*}")
    [[ $state == COMPLETED && $partition == "$PARTITION" && $account == "$ACCOUNT" ]] || bad+=("$row")
done
count() {  # count <rule>: SLURM jobs of that rule in this run
    local n=0 r
    for r in "${rules[@]}"; do [[ $r == "rule_$1" ]] && n=$((n + 1)); done
    echo "$n"
}
finished() {  # finished <rule>: jobs of that rule that finished, SLURM or local ("Finished jobid: N (Rule: <rule>)")
    grep -cE "^Finished jobid: [0-9]+ \(Rule: $1\)$" snakemake.out || true
}
local_count() {  # local_count <rule>: the finished jobs of that rule that were no SLURM job (run on the submit host)
    echo $(($(finished "$1") - $(count "$1")))
}

per_rule=""
for rule in "${!dag_jobs[@]}"; do
    per_rule+="${per_rule:+, }\"$rule\": {\"dag\": ${dag_jobs[$rule]}, \"finished\": $(finished "$rule"),"
    per_rule+=" \"slurm\": $(count "$rule"), \"local\": $(local_count "$rule")}"
done
cat >slurm_run.json <<JSON
{"snakemake_rc": $rc, "wall_time_s": $WALL, "submitted": ${#submitted[@]}, "sacct_jobs": ${#rows[@]},
 "not_completed": ${#bad[@]}, "start": "$START", "rules": {$per_rule}}
JSON
log "$(cat slurm_run.json)"

((rc == 0)) || die "snakemake failed (rc $rc); see $WORKDIR/snakemake.out and .snakemake/slurm_logs/"
[[ -s results/headline.md ]] || die "results/headline.md is missing"
((${#rows[@]} > 0)) || die "sacct lists no jobs since $START"
((${#rows[@]} == ${#submitted[@]})) || die "sacct lists ${#rows[@]} jobs, snakemake submitted ${#submitted[@]}"
((${#bad[@]} == 0)) || die "jobs not COMPLETED in partition $PARTITION / account $ACCOUNT: ${bad[*]}"
# Every job of the DAG finished exactly once, no more of a rule ran on SLURM than finished, and no other job ran.
for rule in "${!dag_jobs[@]}"; do
    (($(finished "$rule") == dag_jobs[$rule])) \
        || die "rule $rule: the DAG has ${dag_jobs[$rule]} jobs, $(finished "$rule") finished"
    (($(local_count "$rule") >= 0)) || die "rule $rule: $(count "$rule") SLURM jobs, only $(finished "$rule") finished"
done
for r in "${rules[@]}"; do
    [[ -n ${dag_jobs[${r#rule_}]:-} ]] || die "sacct lists a job of $r, which the DAG does not have"
done
# The heavy steps ran as SLURM jobs, `report` (a localrule) on the submit host.
for rule in build_index train export_rl evaluate; do
    (($(local_count "$rule") == 0 && $(count "$rule") > 0)) || die "rule $rule did not run as SLURM jobs"
done
(($(count report) == 0)) || die "local rule report was submitted to SLURM"
log "OK: the toy DAG ran as ${#rows[@]} SLURM jobs, all COMPLETED, in ${WALL} s; results in $WORKDIR"
