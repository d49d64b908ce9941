#!/usr/bin/env bash
# A real Slurm on this one host, for tests/test_slurm.py: a private munged,
# a slurmctld and NODES slurmd (nodes n1..nN, each `slurmd -N nI` on its own
# port), every file of theirs in DIR, every port free when chosen.
#
#   bash tests/slurm_cluster.sh up DIR NODES   # as root; prints the slurm.conf path
#   bash tests/slurm_cluster.sh stop DIR       # stops exactly what `up` started
#   SLURM_CONF=DIR/slurm.conf sbatch ...       # clients use this cluster
#
# Debian's packages (slurmctld, slurmd, slurm-client, munge; Slurm 22.05),
# no systemd or cgroups: processes are tracked by parent pid. The slurmd all
# share this host's /tmp, /dev/shm and SysV IPC.
set -euo pipefail

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop() {  # slurmd first (they may run job steps), then the controller, then munged
    local d=$1 f p
    for f in "$d"/run/slurmd-*.pid "$d/run/slurmctld.pid" "$d/run/munged.pid"; do
        alive "$f" || { rm -f "$f"; continue; }
        p=$(cat "$f")
        kill -TERM "$p"
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$p" 2>/dev/null && kill -KILL "$p"
        rm -f "$f"
    done
}

up() {
    local d=$1 nodes=$2 host ports i
    [ "$(id -u)" = 0 ] || { echo "slurm_cluster.sh: run as root" >&2; exit 1; }
    host=$(hostname -s)
    getent hosts "$host" >/dev/null || { echo "slurm_cluster.sh: $host does not resolve" >&2; exit 1; }
    # munged checks that every directory above its socket is searchable by all.
    mkdir -p "$d/run" "$d/state" "$d/log"
    chmod 0755 "$d" "$d/run"
    # Free TCP ports for the controller and each slurmd.
    read -r -a ports < <(python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))' $((nodes + 1)))

    mungekey --create --keyfile="$d/munge.key" 2>/dev/null
    setsid munged -F -S "$d/run/munge.sock" --key-file="$d/munge.key" --pid-file="$d/run/munged.pid.own" \
        --log-file="$d/log/munged.log" --seed-file="$d/munged.seed" </dev/null >>"$d/log/munged.out" 2>&1 &
    echo $! > "$d/run/munged.pid"
    until munge -S "$d/run/munge.sock" -n 2>/dev/null | unmunge -S "$d/run/munge.sock" >/dev/null 2>&1; do
        (( SECONDS < 10 )) && alive "$d/run/munged.pid" || { echo "slurm_cluster.sh: munged did not start" >&2; return 1; }
        sleep 0.1
    done

    cat > "$d/slurm.conf" <<EOF
ClusterName=tfemtest
SlurmctldHost=$host
SlurmctldPort=${ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$d/run/munge.sock
StateSaveLocation=$d/state
SlurmdSpoolDir=$d/spool-%n
SlurmctldPidFile=$d/run/slurmctld.pid.own
SlurmdPidFile=$d/run/slurmd-%n.pid.own
SlurmctldLogFile=$d/log/slurmctld.log
SlurmdLogFile=$d/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# Memory is a consumable, as on most clusters: a step that took all of the
# job's memory would keep the next one waiting.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# More CPUs than the host has, so the test's jobs run side by side.
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=10
MinJobAge=300
InactiveLimit=0
Waittime=0
EOF
    for i in $(seq "$nodes"); do
        echo "NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=${ports[$i]} CPUs=16 RealMemory=4000 State=UNKNOWN"
    done >> "$d/slurm.conf"
    echo "PartitionName=test Nodes=n[1-$nodes] Default=YES MaxTime=INFINITE State=UP" >> "$d/slurm.conf"
    export SLURM_CONF=$d/slurm.conf

    setsid slurmctld -D -i -f "$SLURM_CONF" </dev/null >>"$d/log/slurmctld.out" 2>&1 &
    echo $! > "$d/run/slurmctld.pid"
    until scontrol ping 2>/dev/null | grep -q 'is UP'; do
        (( SECONDS < 20 )) && alive "$d/run/slurmctld.pid" || { echo "slurm_cluster.sh: slurmctld did not start" >&2; return 1; }
        sleep 0.1
    done
    for i in $(seq "$nodes"); do
        setsid slurmd -D -N "n$i" -f "$SLURM_CONF" </dev/null >>"$d/log/slurmd-n$i.out" 2>&1 &
        echo $! > "$d/run/slurmd-n$i.pid"
    done
    while (( SECONDS < 30 )); do
        [ "$(sinfo -h -N -o %T 2>/dev/null | grep -c idle)" = "$nodes" ] && { echo "$SLURM_CONF"; return 0; }
        sleep 0.1
    done
    echo "slurm_cluster.sh: the nodes did not come up:" >&2
    sinfo -N >&2 || true
    tail -n 5 "$d"/log/*.log >&2 || true
    return 1
}

case "${1:-}" in
    up) [ $# = 3 ] || { echo "usage: $0 up DIR NODES" >&2; exit 2; }
        up "$2" "$3" || { stop "$2"; exit 1; } ;;
    stop) [ $# = 2 ] || { echo "usage: $0 stop DIR" >&2; exit 2; }
          stop "$2" ;;
    *) echo "usage: $0 up DIR NODES | stop DIR" >&2; exit 2 ;;
esac
