#!/usr/bin/env bash
# Bring up a single-node SLURM on this machine (as root), for tests/slurm: idempotent.
#
#   tools/slurm/up.sh            # install if absent, configure, start, wait until the node is idle
#
# Installs slurmctld, slurmd, slurm-client and munge (apt) when absent, writes a munge key and
# /etc/slurm/slurm.conf (node = this host, its CPUs and memory as `slurmd -C` reports them), starts
# munged, slurmctld and slurmd when they are not running (restarts the SLURM daemons when the
# config changed) and waits, bounded, until `sinfo` shows the node idle. Exits non-zero with one
# line saying why when it cannot: exit 2 when this machine cannot run it at all (not root, no
# apt-get, no package network), 1 when bring-up failed. UP_TIMEOUT (s, default 90) bounds each wait.
set -euo pipefail

timeout_s="${UP_TIMEOUT:-90}"
conf=/etc/slurm/slurm.conf
marker="# Written by megamoe tools/slurm/up.sh"
host="$(hostname -s)"

die() {
  echo "tools/slurm/up.sh: $*" >&2
  exit 1
}

# cannot WHY: this machine cannot host SLURM (the tests skip on exit status 2).
cannot() {
  echo "tools/slurm/up.sh: cannot run here: $*" >&2
  exit 2
}

say() { echo "tools/slurm/up.sh: $*"; }

# wait_for WHAT COMMAND...: poll COMMAND once a second until it succeeds, at most timeout_s.
wait_for() {
  local what="$1" deadline=$((SECONDS + timeout_s))
  shift
  "$@" >/dev/null 2>&1 && return 0
  say "waiting (at most ${timeout_s}s) for $what"
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 1
  done
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  ((${#missing[@]} == 0)) && return 0
  command -v apt-get >/dev/null || cannot "SLURM is not installed and there is no apt-get to install ${missing[*]}"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # A fresh machine may have no package lists (or stale ones): update once, then retry.
  if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >/tmp/slurm-up-apt.log 2>&1; then
    apt-get update -q >>/tmp/slurm-up-apt.log 2>&1 || cannot "apt-get update failed (no network?); see /tmp/slurm-up-apt.log"
    apt-get install -y -q --no-install-recommends "${missing[@]}" >>/tmp/slurm-up-apt.log 2>&1 ||
      die "apt-get install ${missing[*]} failed; see /tmp/slurm-up-apt.log"
  fi
  for cmd in slurmctld slurmd sbatch munged; do
    command -v "$cmd" >/dev/null || die "$cmd is still missing after apt-get install"
  done
}

start_munge() {
  install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    say "writing a munge key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    runuser -u munge -- munged --force || die "munged did not start (see /var/log/munge/munged.log)"
    wait_for "munge to answer" bash -c 'munge -n | unmunge' || die "munge does not answer"
  fi
}

# The config. Why the non-default settings:
# - proctrack/linuxproc + task/none: no cgroups needed (containers, CI machines);
# - ReturnToService=2: a node that was down (e.g. the machine rebooted) comes back by itself;
# - SchedulerType=sched/builtin, sched_interval=2: a requeued job that becomes eligible again
#   (no event wakes the scheduler then) starts within 2 s, not at the next 60 s scheduling pass;
# - AuthInfo=cred_expire=10: SLURM holds a requeued job (Reason=BeginTime) for the credential
#   lifetime + 1 s, until slurmd no longer holds the old run's revoked credential against it:
#   11 s instead of 121 s, still ample for a step launch on a busy machine;
# - KillWait=10: after a time limit or a requeue, SIGKILL follows SIGTERM after 10 s, not 30 s;
# - MinJobAge=600: finished jobs stay visible to `scontrol show job` for tests to inspect.
write_config() {
  local node
  node="$(slurmd -C | head -n 1)" || die "slurmd -C failed"
  [[ "$node" == NodeName=* ]] || die "unexpected output of slurmd -C: $node"
  if [[ -f "$conf" ]] && ! grep -q "^$marker" "$conf"; then
    cannot "$conf exists and was not written by this script: not touching a real cluster's config"
  fi
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  cat >"$conf.new" <<EOF
$marker: a single-node cluster on $host.
ClusterName=megamoe
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
ReturnToService=2
KillWait=10
MinJobAge=600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
${node%% UpTime=*} State=UNKNOWN
PartitionName=main Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  if cmp -s "$conf.new" "$conf"; then
    rm -f "$conf.new"
    return 1
  fi
  mv "$conf.new" "$conf"
  say "wrote $conf"
}

# stop_daemon NAME PIDFILE: end a running daemon by the pid it recorded (after a config change).
stop_daemon() {
  local pid
  pid="$(cat "$2" 2>/dev/null || true)"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
  say "restarting $1 (pid $pid): its config changed"
  kill "$pid"
  wait_for "$1 (pid $pid) to stop" bash -c "! kill -0 $pid" || die "$1 (pid $pid) did not stop"
}

# running PIDFILE: the daemon that wrote PIDFILE is alive.
running() {
  local pid
  pid="$(cat "$1" 2>/dev/null || true)"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null
}

node_state() { sinfo -h -N -n "$host" -o '%T' 2>/dev/null; }

# The node is up: idle, or already running jobs (a second bring-up while tests run).
node_ready() { [[ "$(node_state)" =~ ^(idle|mixed|allocated|completing)$ ]]; }

main() {
  [[ "$(id -u)" == 0 ]] || cannot "must run as root (it installs packages and starts daemons)"
  install_packages
  getent hosts "$host" >/dev/null || die "this host's name ($host) does not resolve; add it to /etc/hosts"
  start_munge
  if write_config; then
    stop_daemon slurmd /run/slurmd.pid
    stop_daemon slurmctld /run/slurmctld.pid
  fi
  if ! running /run/slurmctld.pid; then
    say "starting slurmctld"
    slurmctld || die "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
  fi
  wait_for "slurmctld to answer" scontrol ping || die "slurmctld does not answer (see /var/log/slurm/slurmctld.log)"
  if ! running /run/slurmd.pid; then
    say "starting slurmd"
    slurmd || die "slurmd did not start (see /var/log/slurm/slurmd.log)"
  fi
  # A node left drained or down by an earlier run: resume it (ReturnToService=2 covers plain down).
  case "$(node_state)" in
    drain* | down* | fail*) scontrol update NodeName="$host" State=RESUME || true ;;
  esac
  wait_for "node $host to be idle in sinfo" node_ready ||
    die "node $host is '$(node_state)', not idle, after ${timeout_s}s (see /var/log/slurm/slurmd.log)"
  say "SLURM is up: node $host $(node_state) ($(sinfo -h -N -n "$host" -o '%c CPUs, %m MB'))"
}

main "$@"
