#!/usr/bin/env bash
# Start a real single-node Slurm on this Debian machine, for tests and development (run as root).
#
#   bash cluster/local_slurm.sh          # installs slurm-wlm + munge if missing, starts munged,
#                                        # slurmctld and slurmd, waits until `sbatch` runs a job
#
# Idempotent: when a Slurm controller already answers and this node is usable it returns at once.
# Configuration: one node named after this host with all its CPUs (cons_tres, CR_Core), linuxproc
# process tracking, no cgroups, no accounting; one partition `debug` (default, no time limit).
# KillWait is short (5 s) so that a hard requeue or cancel does not wait long for SIGKILL.
# JobRequeue=1 (Slurm's default, written out): batch jobs may be requeued (seer's failure restarts).
# Daemons log to /var/log/slurm/; state lives in /var/spool/slurmctld and /var/spool/slurmd.
set -euo pipefail

say() { echo "local_slurm: $*"; }
fail() { echo "local_slurm: error: $*" >&2; exit 1; }

node_usable() {
    local state
    state=$(sinfo -h -N -o '%T' 2>/dev/null | head -n1) || return 1
    [[ -n "$state" && "$state" != *down* && "$state" != *drain* && "$state" != *fail* ]]
}

if command -v sinfo >/dev/null 2>&1 && timeout 10 scontrol ping 2>/dev/null | grep -q UP && node_usable; then
    say "already up ($(sinfo -h -o '%P %D node(s) %T' | head -n1))"
    exit 0
fi

[[ $(id -u) -eq 0 ]] || fail "must run as root to start slurmctld/slurmd (it is $(id -un))"

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || fail "slurm-wlm and munge are not installed and there is no apt-get"
    say "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q slurm-wlm munge >/dev/null
fi

# munge: a key, then the daemon
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n >/dev/null 2>&1; then
    # munged refuses to run as root unless forced; --force also skips the permission checks
    # that fail in containers
    su -s /bin/sh munge -c "munged --force" 2>/dev/null || munged --force
    for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n >/dev/null 2>&1 || fail "munged did not start (see /var/log/munge/munged.log)"
fi

host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
cat >/etc/slurm/slurm.conf <<EOF
# written by seer's cluster/local_slurm.sh: a single-node Slurm for tests and development
ClusterName=local
SlurmctldHost=${host}
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
KillWait=5
JobRequeue=1
MinJobAge=3600
SchedulerParameters=sched_interval=2
NodeName=${host} CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF

# a controller or node daemon left from an earlier start (e.g. with another config): restart both
for pidfile in /run/slurm/slurmctld.pid /run/slurm/slurmd.pid; do
    if [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        kill "$(cat "$pidfile")" && sleep 1
    fi
done
# -D keeps them in the foreground of a background subshell: nothing to daemonize in a container;
# started from / so that they never hold a folder that may be deleted (a checkout, a test's tmp dir):
# slurmstepd inherits that folder and fails each job step when it is gone
(cd / && setsid slurmctld -D -i >/var/log/slurm/slurmctld.out 2>&1 &)
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q UP || fail "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
(cd / && setsid slurmd -D >/var/log/slurm/slurmd.out 2>&1 &)
for _ in $(seq 100); do node_usable && break; sleep 0.2; done
node_usable || fail "slurmd did not register (see /var/log/slurm/slurmd.log; sinfo: $(sinfo -h -N 2>&1 | head -n1))"
if sinfo -h -N -o '%T' | grep -q down; then scontrol update NodeName="$host" State=RESUME; fi

# prove it: a batch job runs to completion
out=$(timeout 60 sbatch --wait --quiet --output=/dev/null --wrap=true 2>&1) || fail "sbatch did not run a job: $out"
say "up: partition debug, node ${host} with ${cpus} CPU(s); sbatch works"
