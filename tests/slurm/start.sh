#!/usr/bin/env bash
# Start a genuine single-node Slurm cluster with all its state under DIR (no systemd, no /etc):
#   munged (own key and socket) -> slurmctld -D -i -> slurmd -D, each under setsid, PIDs in DIR/run.
# Waits until the node is idle, then prints `export SLURM_CONF=DIR/slurm.conf` on stdout (the
# only line on stdout; progress goes to stderr). Stop with `stop.sh DIR`.
#
# Env knobs: SLURM_TEST_CPUS (CPUs the node advertises, default max(nproc, 4); more than the
# machine has is allowed via SlurmdParameters=config_overrides), SLURM_TEST_PORT (slurmctld port,
# slurmd uses +1; default: two free ports), SLURM_TEST_WAIT_S (idle wait, default 30).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

DIR=${1:?usage: start.sh DIR}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
log() { echo "[slurm start] $*" >&2; }

if [[ -f $DIR/run/slurmctld.pid ]] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
    echo "a cluster is already running from $DIR (stop.sh $DIR first)" >&2
    exit 1
fi
for b in munged mungekey slurmctld slurmd sinfo; do
    command -v "$b" >/dev/null || { echo "missing $b: run tests/slurm/install.sh" >&2; exit 2; }
done

mkdir -p "$DIR"/{munge,state,spool,log,run}
chmod 700 "$DIR/munge"
mkdir -p "$DIR/munge/sock"
chmod 755 "$DIR/munge/sock"
HOST=$(hostname -s)
CPUS=${SLURM_TEST_CPUS:-$(( $(nproc) > 4 ? $(nproc) : 4 ))}
SOCK=$DIR/munge/sock/munge.socket.2

free_port() {
    python3 - <<'PY' 2>/dev/null || echo $(( 20000 + RANDOM % 20000 ))
import socket
for _ in range(50):
    s1, s2 = socket.socket(), socket.socket()
    try:
        s1.bind(("127.0.0.1", 0)); p = s1.getsockname()[1]
        s2.bind(("127.0.0.1", p + 1))
        print(p); break
    except OSError:
        pass
    finally:
        s1.close(); s2.close()
PY
}
PORT=${SLURM_TEST_PORT:-$(free_port)}

# --- munge: own key, own socket in a 755 dir --------------------------------------------------
if [[ ! -f $DIR/munge/munge.key ]]; then
    mungekey --create --keyfile="$DIR/munge/munge.key"
fi
chmod 400 "$DIR/munge/munge.key"
setsid munged --foreground --force --socket="$SOCK" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/munged.seed" </dev/null >>"$DIR/log/munged.out" 2>&1 &
echo $! >"$DIR/run/munged.pid"
for _ in $(seq 100); do [[ -S $SOCK ]] && break; sleep 0.05; done
[[ -S $SOCK ]] || { log "munged did not start:"; cat "$DIR/log/munged.out" "$DIR/log/munged.log" >&2 || true; exit 1; }

# --- slurm.conf ---------------------------------------------------------------------------------
cat >"$DIR/slurm.conf" <<CONF
# Single-node test cluster written by tests/slurm/start.sh
ClusterName=fabric-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=$(id -un)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.daemon.pid
SlurmdPidFile=$DIR/run/slurmd.daemon.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=1
SlurmdParameters=config_overrides
MinJobAge=600
KillWait=5
ReturnToService=2
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE OverSubscribe=YES State=UP
CONF
export SLURM_CONF=$DIR/slurm.conf

# --- daemons --------------------------------------------------------------------------------------
setsid slurmctld -D -i -f "$SLURM_CONF" </dev/null >>"$DIR/log/slurmctld.out" 2>&1 &
echo $! >"$DIR/run/slurmctld.pid"
setsid slurmd -D -N "$HOST" -f "$SLURM_CONF" </dev/null >>"$DIR/log/slurmd.out" 2>&1 &
echo $! >"$DIR/run/slurmd.pid"

WAIT=${SLURM_TEST_WAIT_S:-30}
state=""
for _ in $(seq $((WAIT * 10))); do
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
    [[ $state == idle* ]] && break
    for d in slurmctld slurmd munged; do
        kill -0 "$(cat "$DIR/run/$d.pid")" 2>/dev/null || { log "$d died"; state="dead:$d"; break 2; }
    done
    sleep 0.1
done
if [[ $state != idle* ]]; then
    log "node not idle after ${WAIT}s (state '${state}'); logs:"
    tail -n 30 "$DIR"/log/*.out "$DIR"/log/*.log >&2 || true
    exit 1
fi
log "node $HOST idle ($CPUS CPUs, partition debug, port $PORT)"
echo "export SLURM_CONF=$SLURM_CONF"
