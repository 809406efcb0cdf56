#!/usr/bin/env bash
# Stop the cluster started by `start.sh DIR`: cancel every job, wait for them to end, TERM each
# daemon by its recorded PID (KILL after 10 s), munged last. Leaves nothing running.
set -uo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

DIR=${1:?usage: stop.sh DIR}
DIR=$(cd "$DIR" 2>/dev/null && pwd) || { echo "no such dir: $1" >&2; exit 0; }
export SLURM_CONF=$DIR/slurm.conf
log() { echo "[slurm stop] $*" >&2; }

alive() { [[ -f $DIR/run/$1.pid ]] && kill -0 "$(cat "$DIR/run/$1.pid")" 2>/dev/null; }

if alive slurmctld && [[ -f $SLURM_CONF ]]; then
    jobs=$(squeue -h -t PD,R,CG,CF,S -o %i 2>/dev/null | tr '\n' ' ')
    if [[ -n ${jobs// /} ]]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 150); do  # up to 15 s for the steps to be killed
            [[ -z $(squeue -h -t PD,R,CG,CF,S -o %i 2>/dev/null) ]] && break
            sleep 0.1
        done
    fi
fi

stop_pid() {  # name
    local name=$1 pid
    [[ -f $DIR/run/$name.pid ]] || return 0
    pid=$(cat "$DIR/run/$name.pid")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name ($pid) ignored TERM for 10 s; KILL"
            kill -KILL "$pid" 2>/dev/null
            sleep 0.2
        fi
    fi
    rm -f "$DIR/run/$name.pid"
}

stop_pid slurmd
stop_pid slurmctld
stop_pid munged
log "stopped (state in $DIR)"
