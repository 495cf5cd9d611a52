#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for testing the Slurm launcher end to end:
# munged, slurmctld and slurmd from Debian's packages, run directly as root daemons (no systemd), with
# every file (config, munge key and socket, state, spool, logs) in one private folder: the packages'
# config in /etc is neither read nor written, and a second checkout can run its own cluster beside this
# one (give it another folder and other ports).
#
#   scripts/slurm_cluster.sh start    installs the packages when missing, writes the config, starts the
#                                     daemons, waits until the node is idle (does nothing when running)
#   scripts/slurm_cluster.sh stop     cancels the cluster's jobs and stops the daemons
#   scripts/slurm_cluster.sh status   exit 0 and the partition's state when the cluster answers, else 1
#   scripts/slurm_cluster.sh env      prints the exports that point Slurm's commands at this cluster:
#                                     eval "$(scripts/slurm_cluster.sh env)"
#
# Settings (environment):
#   ATTNBENCH_SLURM_DIR        the private folder            [/tmp/attnbench-slurm]
#   ATTNBENCH_SLURM_PARTITION  the one (default) partition   [debug]
#   ATTNBENCH_SLURM_PORT       slurmctld's port; slurmd uses the next one  [16817]
#
# Choices that make it work in a container without systemd or cgroups:
# - everything runs as root (SlurmUser=root): no slurm-owned state folders, and slurmd must be root anyway
#   to start jobs as their submitter;
# - the controller and the node are both called "localhost" at 127.0.0.1, so neither the machine's
#   hostname nor its resolution matters (slurmd is started with -N localhost);
# - proctrack/linuxproc and task/none track job processes through /proc, without cgroups;
# - no accounting database: `sacct` answers "accounting storage is disabled", which leaves submitit unable
#   to see a job end without a result (a cancelled job waits for ever). jobcomp/filetxt writes one line
#   per finished job, and scripts/slurm_sacct.sh (copied to <folder>/bin/sacct; `env` puts it first on
#   PATH) answers submitit's `sacct -o JobID,State,NodeList --parsable2 -j ID` from that file and squeue;
# - SlurmdParameters=config_overrides: the node keeps the configured CPUs and memory even where the
#   hardware that slurmd detects differs (a container's CPU limit), instead of being drained;
# - short KillWait (a cancelled job ends in seconds), MinJobAge (a finished job leaves squeue in seconds;
#   the jobcomp file keeps its end state) and cred_expire (a requeued job starts again in seconds), and
#   a scheduler pass every second, so that the tests stay short.
set -euo pipefail

DIR=${ATTNBENCH_SLURM_DIR:-/tmp/attnbench-slurm}
PARTITION=${ATTNBENCH_SLURM_PARTITION:-debug}
PORT=${ATTNBENCH_SLURM_PORT:-16817}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NODE=localhost
CONF=$DIR/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket
# seconds between a plain scancel's SIGTERM and its SIGKILL (tests/test_slurm_cluster.py measures it)
KILL_WAIT=5
# job step credentials' lifetime, which is also how long a requeued job waits before it may start again
# (Slurm's default of 120 s would make every preemption test wait two minutes)
CRED_EXPIRE=5

die() { echo "slurm_cluster.sh: error: $*" >&2; exit 1; }
say() { echo "slurm_cluster.sh: $*" >&2; }

export SLURM_CONF=$CONF

pid_alive() {  # pid file -> 0 when its process runs
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

answers() {  # 0 when slurmctld answers and the node can run jobs (idle, mixed, allocated, completing)
    [[ -f $CONF ]] || return 1
    local state
    state=$(timeout 5 sinfo -h -p "$PARTITION" -o %t 2>/dev/null) || return 1
    [[ $state =~ ^(idle|mix|alloc|comp)$ ]]
}

all_running() {
    pid_alive "$DIR/munge/munged.pid" && pid_alive "$DIR/run/slurmctld.pid" && pid_alive "$DIR/run/slurmd.pid"
}

install_packages() {
    local missing=() cmd
    for cmd in munged munge unmunge slurmctld slurmd sinfo sbatch srun squeue scontrol scancel; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    say "missing ${missing[*]}; installing Debian's munge, slurmctld, slurmd and slurm-client"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them (Debian or Ubuntu needed)"
    # keep the packages' own services from starting (their config in /etc is not this cluster's):
    # invoke-rc.d and deb-systemd-invoke both ask policy-rc.d, and exit status 101 means "do not start"
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
    fi
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends
               munge slurmctld slurmd slurm-client)
    local ok=0
    "${apt[@]}" >"$DIR/apt.log" 2>&1 && ok=1
    if [[ $ok == 0 ]]; then  # a fresh machine has no package lists yet
        apt-get update -q >>"$DIR/apt.log" 2>&1 && "${apt[@]}" >>"$DIR/apt.log" 2>&1 && ok=1
    fi
    [[ $made_policy == 1 ]] && rm -f "$policy"
    [[ $ok == 1 ]] || { tail -n 15 "$DIR/apt.log" >&2; die "apt-get could not install the packages (log: $DIR/apt.log)"; }
}

write_config() {
    local cpus mem_mb
    cpus=$(nproc)
    # 90% of the memory: slurmd refuses jobs that ask for more than the node has, and the rest is the OS's
    mem_mb=$(free -m | awk '/^Mem:/ {print int($2 * 0.9)}')
    [[ $mem_mb -gt 0 ]] || die "could not read the memory size from free -m"
    cat >"$CONF" <<EOF
# written by scripts/slurm_cluster.sh: a one-node test cluster, every path inside $DIR
ClusterName=attnbench
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobContainerType=job_container/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# a job that asks for no memory gets its CPUs' share, not the whole node (which would run one at a time)
DefMemPerCPU=$((mem_mb / cpus))
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=5
KillWait=$KILL_WAIT
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    # munged checks permissions: the key's folder and the key writable by its owner only, the socket's
    # folder searchable by everyone
    mkdir -p "$DIR/munge/key"
    chmod 700 "$DIR/munge/key"
    chmod 755 "$DIR/munge"
    if [[ ! -s $DIR/munge/key/munge.key ]]; then
        if command -v mungekey >/dev/null; then  # munge >= 0.5.14; older ones take any random bytes
            mungekey -c -b 1024 -k "$DIR/munge/key/munge.key"
        else
            dd if=/dev/urandom of="$DIR/munge/key/munge.key" bs=128 count=1 status=none
        fi
    fi
    chmod 600 "$DIR/munge/key/munge.key"
    # --force: munged refuses a socket left by a munged that died
    munged --force --key-file="$DIR/munge/key/munge.key" --socket="$MUNGE_SOCKET" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed" \
        || { tail -n 5 "$DIR/log/munged.log" >&2; die "munged did not start (log: $DIR/log/munged.log)"; }
    munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null \
        || die "munged runs but does not answer on $MUNGE_SOCKET"
}

cmd_start() {
    [[ $EUID -eq 0 ]] || die "needs root: slurmd starts jobs as their submitter and apt-get installs the packages"
    mkdir -p "$DIR"
    if all_running && answers; then
        say "already running (SLURM_CONF=$CONF)"
        return 0
    fi
    install_packages
    cmd_stop quiet  # whatever is left of an earlier cluster in this folder
    local t0=$SECONDS
    # a fresh state each start: job ids restart at 1, so the finished-job file starts empty too
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/jobcomp.txt"
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/log" "$DIR/bin"
    for f in "$DIR"/log/*.log; do [[ -f $f ]] && mv -f "$f" "$f.old"; done
    install -m 755 "$HERE/slurm_sacct.sh" "$DIR/bin/sacct"
    write_config
    start_munge
    # -c: no state to recover; -f: this config (also read from SLURM_CONF, given for clarity)
    slurmctld -c -f "$CONF" || { tail -n 10 "$DIR/log/slurmctld.log" >&2; die "slurmctld did not start"; }
    slurmd -f "$CONF" -N "$NODE" || { tail -n 10 "$DIR/log/slurmd.log" >&2; die "slurmd did not start"; }
    local deadline=$((SECONDS + 30))
    until answers; do
        if ((SECONDS > deadline)); then
            sinfo -N -l >&2 || true
            for f in slurmctld slurmd; do echo "--- $DIR/log/$f.log" >&2; tail -n 10 "$DIR/log/$f.log" >&2; done
            die "the node did not become idle within 30 s"
        fi
        sleep 0.2
    done
    say "started in $((SECONDS - t0)) s: partition $PARTITION, $(nproc) CPUs; SLURM_CONF=$CONF"
}

stop_daemons() {  # SIGTERM to all at once (each takes about 2 s to exit), SIGKILL to any left after 10 s
    local file pid pids=()
    for file in "$DIR/run/slurmd.pid" "$DIR/run/slurmctld.pid" "$DIR/munge/munged.pid"; do
        if pid_alive "$file"; then
            pid=$(cat "$file")
            kill "$pid" 2>/dev/null && pids+=("$pid")
        fi
        rm -f "$file"
    done
    for _ in $(seq 100); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || return 0
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            say "process $pid ignored SIGTERM for 10 s; killing it"
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
}

cmd_stop() {
    if pid_alive "$DIR/run/slurmctld.pid" && [[ -f $CONF ]]; then
        # jobs outlive slurmd (slurmstepd runs them), so end them while the cluster can still do it
        if [[ -n $(timeout 5 squeue -h -o %A 2>/dev/null) ]]; then
            timeout 5 scancel --full --partition="$PARTITION" 2>/dev/null || true
            for _ in $(seq $((KILL_WAIT * 5 + 10))); do
                [[ -z $(timeout 5 squeue -h -t running,completing -o %A 2>/dev/null) ]] && break
                sleep 0.2
            done
        fi
    fi
    stop_daemons
    [[ ${1:-} == quiet ]] || say "stopped"
}

cmd_status() {
    if all_running && answers; then
        sinfo -p "$PARTITION"
        return 0
    fi
    echo "not running (folder $DIR)"
    return 1
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF PATH=$DIR/bin:\$PATH" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
