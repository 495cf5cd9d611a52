#!/usr/bin/env bash
# `sacct` for the test cluster of scripts/slurm_cluster.sh, which has no accounting database: answers
# the query submitit makes to follow its jobs,
#     sacct -o JobID,State,NodeList --parsable2 -j 12 -j 13
# from squeue (jobs the controller still holds: pending, running, and finished ones for MinJobAge
# seconds) and from the jobcomp/filetxt file (one line per finished job, kept for the cluster's life).
# squeue wins where both know a job: a requeued job's file line is from its earlier run.
# Understood: -o/--format FIELDS, -j/--jobs IDS, -P/--parsable2, -p/--parsable, -n/--noheader; other
# options are accepted and ignored. Fields: JobID JobIDRaw JobName State NodeList Partition ExitCode
# Submit Start End (others print empty). JobID is "ARRAYID_TASK" for an array task, like sacct.
# States are Slurm's words (COMPLETED, CANCELLED, FAILED, TIMEOUT, ...); a real sacct writes
# "CANCELLED by UID" where this writes CANCELLED.
set -euo pipefail

jobcomp=${ATTNBENCH_SLURM_JOBCOMP:-$(dirname "$0")/../jobcomp.txt}
fields=JobID,JobName,Partition,State,ExitCode
ids=""
parsable=2
header=1
while (($#)); do
    case $1 in
        -o|--format) fields=$2; shift ;;
        --format=*) fields=${1#--format=} ;;
        -j|--jobs) ids+=",$2"; shift ;;
        --jobs=*) ids+=",${1#--jobs=}" ;;
        -P|--parsable2) parsable=2 ;;
        -p|--parsable) parsable=1 ;;
        -n|--noheader) header=0 ;;
        -S|--starttime|-E|--endtime|-u|--user|-s|--state|-M|--clusters|-A|--accounts|-r|--partition) shift ;;
        *) ;;
    esac
    shift
done

queue=$(squeue -h --array -o '%A|%F|%K|%T|%N|%j|%P|%V|%S|%e') \
    || { echo "sacct (slurm_sacct.sh): squeue failed; is the cluster running?" >&2; exit 1; }

{
    [[ -f $jobcomp ]] && sed 's/^/C /' "$jobcomp"
    [[ -n $queue ]] && sed 's/^/Q /' <<<"$queue"
    true
} | awk -v fields="$fields" -v ids="${ids#,}" -v parsable="$parsable" -v header="$header" '
BEGIN {
    nf = split(fields, f, ",")
    canon["jobid"] = "JobID"; canon["jobidraw"] = "JobIDRaw"; canon["jobname"] = "JobName"
    canon["state"] = "State"; canon["nodelist"] = "NodeList"; canon["partition"] = "Partition"
    canon["exitcode"] = "ExitCode"; canon["submit"] = "Submit"; canon["start"] = "Start"
    canon["end"] = "End"
    for (i = 1; i <= nf; i++) {
        k = tolower(f[i]); sub(/%.*/, "", k)
        f[i] = (k in canon) ? canon[k] : f[i]
    }
    nid = split(ids, want, ",")
    for (i = 1; i <= nid; i++) wanted[want[i]] = 1
}
function keep(raw, array_id, task,    main) {
    if (nid == 0) return 1
    main = (task == "") ? raw : array_id
    return (raw in wanted) || (main in wanted) || ((main "_" task) in wanted)
}
function record(raw, array_id, task, state, nodes, name, part, submit, start, end, code,    id) {
    if (!keep(raw, array_id, task)) return
    id = (task == "") ? raw : array_id "_" task
    if (!(id in seen)) { order[++n] = id; seen[id] = 1 }
    v[id, "JobID"] = id; v[id, "JobIDRaw"] = raw; v[id, "State"] = state; v[id, "NodeList"] = nodes
    v[id, "JobName"] = name; v[id, "Partition"] = part; v[id, "Submit"] = submit
    v[id, "Start"] = start; v[id, "End"] = end; v[id, "ExitCode"] = code
    num[id] = raw + 0
}
$1 == "C" {  # jobcomp/filetxt: space-separated KEY=VALUE
    delete kv
    for (i = 2; i <= NF; i++) { p = index($i, "="); if (p) kv[substr($i, 1, p - 1)] = substr($i, p + 1) }
    record(kv["JobId"], kv["ArrayJobId"], kv["ArrayTaskId"], kv["JobState"], kv["NodeList"], kv["Name"],
           kv["Partition"], kv["SubmitTime"], kv["StartTime"], kv["EndTime"], kv["ExitCode"])
    next
}
$1 == "Q" {  # squeue: %A|%F|%K|%T|%N|%j|%P|%V|%S|%e
    split(substr($0, 3), q, "|")
    task = (q[3] == "N/A") ? "" : q[3]
    record(q[1], q[2], task, q[4], q[5], q[6], q[7], q[8], q[9], q[10], "")
}
END {
    sep = "|"; tail = (parsable == 1) ? "|" : ""
    if (header) { line = f[1]; for (i = 2; i <= nf; i++) line = line sep f[i]; print line tail }
    # by raw job id, as sacct lists them (insertion sort: a handful of jobs)
    for (i = 2; i <= n; i++) {
        x = order[i]; j = i - 1
        while (j > 0 && num[order[j]] > num[x]) { order[j + 1] = order[j]; j-- }
        order[j + 1] = x
    }
    for (r = 1; r <= n; r++) {
        id = order[r]; line = v[id, f[1]]
        for (i = 2; i <= nf; i++) line = line sep v[id, f[i]]
        print line tail
    }
}'
