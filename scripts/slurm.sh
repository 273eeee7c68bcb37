#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the `slurm`-marked
# tests and for demos: munged, slurmctld and slurmd, all state under one
# directory, no systemd (this machine kind has none).
#
#   scripts/slurm.sh up       install slurm-wlm + munge if missing, start, wait until idle
#   scripts/slurm.sh down     cancel every job, stop the daemons, remove the state dir
#   scripts/slurm.sh status   exit 0 iff all three daemons run and the node answers
#   scripts/slurm.sh env      the export line for clients: eval "$(scripts/slurm.sh env)"
#
# State dir: ${GEMINI_SLURM_DIR:-/tmp/gemini-slurm}. Both `up` and `down` are
# idempotent. The node declares more CPUs than the machine has
# (SlurmdParameters=config_overrides) so that a 4-task job fits on 2 cores:
# several ranks per host is exactly what the tests need.
set -euo pipefail

DIR="${GEMINI_SLURM_DIR:-/tmp/gemini-slurm}"
CONF="$DIR/slurm.conf"
SOCKET="$DIR/munge/munge.socket"
# Bounded waits, in seconds.
READY_TIMEOUT="${GEMINI_SLURM_TIMEOUT:-30}"
STOP_TIMEOUT=10
# The daemons, in start order; each leaves $DIR/<name>.pid.
DAEMONS=(munged slurmctld slurmd)

say() { printf 'slurm: %s\n' "$*"; }

# Said after a failure's log, once there is something to clean up.
HINT=""

# One clear line, then the log that explains it.
fail() {
    local log="${2:-}"
    say "FAILED: $1" >&2
    if [[ -n $log && -s $log ]]; then
        echo "---- last lines of $log ----" >&2
        tail -n 20 "$log" >&2
    fi
    [[ -z $HINT ]] || say "$HINT" >&2
    exit 1
}

pid_of() {
    local file="$DIR/$1.pid"
    [[ -s $file ]] && cat "$file"
}

# Alive and still that daemon: a pid file left from before a reboot may name
# an unrelated process, which must be neither trusted nor killed.
alive() {
    local pid
    pid=$(pid_of "$1") || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]]
}

running_count() {
    local n=0 d
    for d in "${DAEMONS[@]}"; do
        if alive "$d"; then n=$((n + 1)); fi
    done
    echo "$n"
}

# Clients find the munge socket through AuthInfo in slurm.conf, so SLURM_CONF
# is all a shell needs.
env_lines() {
    echo "export SLURM_CONF=$CONF"
}

# Empty when the controller does not answer (never an error: callers report it).
node_state() {
    SLURM_CONF="$CONF" timeout 5 sinfo -h -o %t 2>/dev/null | head -n 1 || true
}

install_if_missing() {
    local missing=()
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sinfo >/dev/null || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    ((${#missing[@]})) || return 0
    say "installing ${missing[*]} (apt-get)"
    [[ $(id -u) -eq 0 ]] || fail "installing ${missing[*]} needs root (or install them yourself)"
    apt-get update -qq || fail "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
        || fail "apt-get install ${missing[*]} failed"
}

write_config() {
    local user host
    user=$(id -un)
    host=$(hostname)
    mkdir -p "$DIR"/{munge,state,spool,log}
    # munged refuses a socket directory others can write to, and clients
    # must be able to reach the socket in it.
    chmod 755 "$DIR" "$DIR/munge"

    # A fresh key per cluster: the daemons and the clients of this machine are
    # the only ones that ever authenticate with it.
    if [[ ! -s $DIR/munge/munge.key ]]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1 count=1024 status=none
        chmod 0400 "$DIR/munge/munge.key"
    fi

    # SLURM's default ports; a second cluster on this host needs other ones
    # (GEMINI_SLURMCTLD_PORT, GEMINI_SLURMD_PORT).
    cat >"$CONF" <<EOF
# Written by scripts/slurm.sh; removed by \`scripts/slurm.sh down\`.
ClusterName=gemini
SlurmctldHost=$host(127.0.0.1)
SlurmUser=$user
SlurmdUser=$user
SlurmctldPort=${GEMINI_SLURMCTLD_PORT:-6817}
SlurmdPort=${GEMINI_SLURMD_PORT:-6818}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups without systemd: track processes by parentage, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
# No mail server here; the default MailProg does not exist.
MailProg=/bin/true
# A node that was down (a restart of slurmd) comes back by itself.
ReturnToService=2
# Trust the CPUs declared below over what slurmd counts: oversubscribing the
# machine's cores is what lets several tasks share this one host.
SlurmdParameters=config_overrides
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=30
KillWait=5
NodeName=$host NodeAddr=127.0.0.1 CPUs=8 Boards=1 SocketsPerBoard=1 CoresPerSocket=8 ThreadsPerCore=1 RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_daemons() {
    # --force: munged (as root) otherwise refuses key and socket paths under a
    # world-writable /tmp, which is where this throwaway cluster lives.
    munged --force \
        --key-file="$DIR/munge/munge.key" \
        --socket="$SOCKET" \
        --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munge.seed" \
        || fail "munged did not start" "$DIR/log/munged.log"
    # munged forks before its socket exists: the daemons would fail to
    # authenticate if started too early.
    wait_for 10 test -S "$SOCKET" || fail "munged made no socket" "$DIR/log/munged.log"

    # -i: ignore any saved state (a cluster from an earlier `up` is gone).
    SLURM_CONF="$CONF" slurmctld -i || fail "slurmctld did not start" "$DIR/log/slurmctld.log"
    SLURM_CONF="$CONF" slurmd || fail "slurmd did not start" "$DIR/log/slurmd.log"
}

# wait_for SECONDS CMD...: poll CMD every 0.2 s until it succeeds (1 on timeout).
wait_for() {
    local seconds=$1
    shift
    local deadline=$((SECONDS + seconds))
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

queue_empty() {
    [[ -z $(SLURM_CONF="$CONF" timeout 5 squeue -h 2>/dev/null) ]]
}

node_idle() {
    [[ $(node_state) == idle ]]
}

cmd_up() {
    local n
    n=$(running_count)
    if ((n == ${#DAEMONS[@]})); then
        say "already running (state in $DIR)"
        env_lines
        return 0
    fi
    if ((n > 0)); then
        say "only $n of ${#DAEMONS[@]} daemons are running: restarting cleanly"
        cmd_down
    fi
    install_if_missing
    HINT="logs stay in $DIR/log; \`$0 down\` stops whatever started"
    write_config
    start_daemons
    if ! wait_for "$READY_TIMEOUT" node_idle; then
        local log="$DIR/log/slurmd.log"
        alive slurmctld || log="$DIR/log/slurmctld.log"
        fail "node not idle after ${READY_TIMEOUT} s (sinfo says: '$(node_state)')" "$log"
    fi
    say "up: node $(hostname) idle, state in $DIR"
    echo "point a shell at it with:"
    echo "  eval \"\$(scripts/slurm.sh env)\"    # or: $(env_lines)"
}

# stop NAME: SIGTERM by pid file, wait, then SIGKILL.
stop() {
    local pid
    alive "$1" || return 0
    pid=$(pid_of "$1")
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_for "$STOP_TIMEOUT" eval "! kill -0 $pid 2>/dev/null"; then
        say "$1 (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT} s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
}

cmd_down() {
    if [[ ! -d $DIR ]]; then
        say "not running (no $DIR)"
        return 0
    fi
    if alive slurmctld; then
        # Every job first, whoever submitted it, so that slurmd kills their
        # processes; and wait for the queue to empty before the daemons go.
        local jobs
        jobs=$(SLURM_CONF="$CONF" timeout 5 squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086  # one argument per job id
            SLURM_CONF="$CONF" timeout 10 scancel --full --quiet $jobs 2>/dev/null || true
            wait_for 10 queue_empty || say "jobs still queued after 10 s: stopping anyway"
        fi
    fi
    # Reverse start order: the node, the controller, then the authenticator.
    local i
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        stop "${DAEMONS[i]}"
    done
    rm -rf "$DIR"
    say "down (removed $DIR)"
}

cmd_status() {
    local d ok=0
    for d in "${DAEMONS[@]}"; do
        if alive "$d"; then
            echo "$d: running (pid $(pid_of "$d"))"
        else
            echo "$d: not running"
            ok=1
        fi
    done
    if ((ok == 0)); then
        local state
        state=$(node_state)
        echo "node $(hostname): ${state:-no answer}"
        [[ -n $state ]] || ok=1
    fi
    return "$ok"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) env_lines ;;
    *)
        echo "usage: $0 up|down|status|env" >&2
        exit 2
        ;;
esac
