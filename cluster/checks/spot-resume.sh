#!/usr/bin/env bash
# spot-resume.sh: a budgeted check of the AWS fleet against the real cloud.
#
# NOT RUN BY THE TESTS, IN CI OR ON ANY MACHINE WITHOUT AWS CREDENTIALS. It
# launches real EC2 instances and costs real money (it prints the estimate and
# stops if it is over BUDGET_USD). tests/test_cluster.py only checks its
# syntax (bash -n, shellcheck). Run it by hand, from the repository root, with
# the Terraform of infra/terraform/aws applied and the images pushed:
#
#   terraform -chdir=infra/terraform/aws output -json > cluster/tf.json
#   ray get-auth-token --generate            # once
#   BUDGET_USD=5 cluster/checks/spot-resume.sh cluster/tf.json
#   RUN_P4D=1 BUDGET_USD=70 cluster/checks/spot-resume.sh cluster/tf.json
#
# What it checks, on a cluster of its own (the same cluster_name as the fleet,
# so nothing else of that name may be running; it refuses if anything is):
#   1. `ray up` with the head, the g5 spot and on-demand types only (and, with
#      RUN_P4D=1, the p4d types; never p5);
#   2. a short GPU training job (jobs/smoke-forward.yaml on 1 GPU, Fashion-MNIST
#      shards written to the bucket) that checkpoints every 20 steps;
#   3. after its first checkpoint, the worker's instance is taken away:
#      INTERRUPT=terminate (default) `aws ec2 terminate-instances`, or
#      INTERRUPT=fis an AWS FIS spot interruption (two minutes' notice, so the
#      spot notice watcher drains the node first; needs FIS_ROLE_ARN, a role
#      FIS may assume with ec2:SendSpotInstanceInterruptions);
#   4. `ray job logs` must show "resumed <run> at step N" (N > 0) and the job
#      must SUCCEED on a replacement node (spot, or on-demand if spot fails);
#   5. RUN_P4D=1: an NCCL all-reduce between two p4d.24xlarge (16 A100) with
#      NCCL_DEBUG=INFO must log NET/OFI (aws-ofi-nccl over EFA) and not fall
#      back to NET/Socket.
# `ray down` runs on every exit (trap), success or failure.
#
# Needs locally: aws CLI + Session Manager plugin, ray, biflow (this checkout
# installed), python3, and the Fashion-MNIST files (make dataset).

set -euo pipefail

TF_JSON="${1:?usage: $0 TF_OUTPUT_JSON  (terraform output -json)}"
BUDGET_USD="${BUDGET_USD:-5}"
RUN_P4D="${RUN_P4D:-0}"
INTERRUPT="${INTERRUPT:-terminate}"
FMNIST="${FMNIST:-/usr/share/datasets/fashion-mnist}"
ADDRESS="http://127.0.0.1:8265"
export RAY_AUTH_MODE=token

# List prices, USD/hour (us-east-1/us-west-2, on-demand; spot is cheaper) and
# the hours each kind runs here, generous.
HEAD_USD=0.38; HEAD_H=1.0          # m6i.2xlarge, for the whole check
G5_USD=1.21; G5_H=1.0              # g5.2xlarge: the first worker + its replacement
P4D_USD=32.77; P4D_H=0.9           # p4d.24xlarge x2, boot + all-reduce + idle timeout

work="$(mktemp -d)"
tunnel_pid=""
fis_template=""
cfg="$work/aws.yaml"
started=0

cleanup() {
  local rc=$?
  set +e
  [ -n "$tunnel_pid" ] && kill "$tunnel_pid" 2>/dev/null
  [ -n "$fis_template" ] && aws fis delete-experiment-template --id "$fis_template" >/dev/null
  if [ "$started" = 1 ]; then
    echo "== ray down (always)"
    ray down -y "$cfg"
  fi
  echo "== work files: $work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() { echo "FAIL: $*" >&2; exit 1; }
out() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]]["value"])' "$TF_JSON" "$1"; }

region="$(out region)"
cluster="$(out cluster_name)"
bucket="$(out bucket_name)"
export AWS_DEFAULT_REGION="$region"

# ---- cost --------------------------------------------------------------------
estimate="$(python3 -c "
h, g, p = $HEAD_USD * $HEAD_H, $G5_USD * $G5_H, 2 * $P4D_USD * $P4D_H * ($RUN_P4D == 1)
print(f'{h + g + p:.2f}')")"
echo "== expected cost: about $estimate USD (head ${HEAD_USD}/h, g5.2xlarge ${G5_USD}/h at most,"
echo "   p4d.24xlarge x2 ${P4D_USD}/h each: $([ "$RUN_P4D" = 1 ] && echo yes || echo skipped)); budget $BUDGET_USD USD"
python3 -c "import sys; sys.exit(0 if $estimate <= $BUDGET_USD else 1)" \
  || fail "the estimate is over BUDGET_USD=$BUDGET_USD; raise it to run"

running="$(aws ec2 describe-instances \
  --filters "Name=tag:ray-cluster-name,Values=$cluster" "Name=instance-state-name,Values=pending,running" \
  --query 'length(Reservations[].Instances[])' --output text)"
[ "$running" = 0 ] || fail "$running instance(s) of cluster $cluster are running; this check needs it down"

# ---- the check's own cluster config -------------------------------------------
biflow cluster render --terraform-output "$TF_JSON" --out "$work"
python3 - "$cfg" "$RUN_P4D" <<'EOF'
import sys, yaml
path, p4d = sys.argv[1], sys.argv[2] == "1"
cfg = yaml.safe_load(open(path))
keep = {"head", "gpu-1x-a10g-spot", "gpu-1x-a10g-ondemand"} | ({"gpu-8x-a100-spot", "gpu-8x-a100-ondemand"} if p4d else set())
cfg["available_node_types"] = {k: v for k, v in cfg["available_node_types"].items() if k in keep}
for name, t in cfg["available_node_types"].items():
    if name != "head":
        t["max_workers"] = 2
cfg["max_workers"] = 4
cfg["idle_timeout_minutes"] = 5
yaml.safe_dump(cfg, open(path, "w"), sort_keys=False)
EOF

# ---- data: Fashion-MNIST shards in the bucket -------------------------------------
data_uri="s3://$bucket/checks/fashion-mnist"
biflow prepare-data "$FMNIST" "$data_uri" --format fashion-mnist --region "$region"

# ---- up ----------------------------------------------------------------------
echo "== ray up"
started=1
ray up -y "$cfg"
ray dashboard "$cfg" > "$work/dashboard.log" 2>&1 &
tunnel_pid=$!
for _ in $(seq 60); do
  curl -fsS "$ADDRESS/api/version" >/dev/null 2>&1 && break
  sleep 5
done
curl -fsS "$ADDRESS/api/version" >/dev/null || fail "no dashboard through the tunnel (see $work/dashboard.log)"

# ---- 2. a short GPU job that checkpoints ------------------------------------------
run="spot-resume-$(date +%Y%m%d%H%M%S)"
sets=(--set "name=$run" --set "data.uri=$data_uri" --set "ray.storage=s3://$bucket/checks/runs"
      --set ray.workers=1 --set ray.use_gpu=yes --set ray.cpus_per_worker=4 --set ray.max_failures=3
      --set train.steps=400 --set train.checkpoint_every=20 --set train.log_every=10)
job_id="$(python -m biflow.submit jobs/smoke-forward.yaml "${sets[@]}")"
echo "== submit $job_id"
biflow submit jobs/smoke-forward.yaml --address "$ADDRESS" --no-follow --no-upload-code "${sets[@]}"

wait_log() {  # wait_log PATTERN SECONDS: until the job's log matches
  local deadline=$((SECONDS + $2))
  while [ "$SECONDS" -lt "$deadline" ]; do
    ray job logs "$job_id" --address "$ADDRESS" > "$work/job.log" 2>&1 || true
    grep -Eq "$1" "$work/job.log" && return 0
    sleep 15
  done
  return 1
}
# past the first checkpoint (step 20): the loop logs "[forward] step  30/400 | loss ..."
wait_log "step +(3[0-9]|[4-9][0-9]|[1-9][0-9][0-9])/400" 1800 || fail "no step 30 within 30 min (log: $work/job.log)"

# ---- 3. take the worker away ----------------------------------------------------
instance="$(aws ec2 describe-instances \
  --filters "Name=tag:ray-cluster-name,Values=$cluster" "Name=instance-state-name,Values=running" \
            "Name=tag:ray-user-node-type,Values=gpu-1x-a10g-spot,gpu-1x-a10g-ondemand" \
  --query 'Reservations[0].Instances[0].[InstanceId,InstanceLifecycle]' --output text)"
read -r instance_id lifecycle <<<"$instance"
[ "$lifecycle" = None ] && lifecycle=on-demand
[ -n "$instance_id" ] && [ "$instance_id" != None ] || fail "no g5 worker found"
echo "== interrupting $instance_id ($lifecycle) by $INTERRUPT"
if [ "$INTERRUPT" = fis ]; then
  [ "$lifecycle" = spot ] || fail "INTERRUPT=fis needs a spot worker; this one is on-demand"
  account="$(aws sts get-caller-identity --query Account --output text)"
  cat > "$work/fis.json" <<EOF
{"description": "biflow spot-resume check",
 "roleArn": "${FIS_ROLE_ARN:?INTERRUPT=fis needs FIS_ROLE_ARN}",
 "stopConditions": [{"source": "none"}],
 "targets": {"worker": {"resourceType": "aws:ec2:spot-instance", "selectionMode": "ALL",
   "resourceArns": ["arn:aws:ec2:$region:$account:instance/$instance_id"]}},
 "actions": {"interrupt": {"actionId": "aws:ec2:send-spot-instance-interruptions",
   "parameters": {"durationBeforeInterruption": "PT2M"}, "targets": {"SpotInstances": "worker"}}}}
EOF
  fis_template="$(aws fis create-experiment-template --cli-input-json "file://$work/fis.json" \
    --query experimentTemplate.id --output text)"
  aws fis start-experiment --experiment-template-id "$fis_template" >/dev/null
else
  aws ec2 terminate-instances --instance-ids "$instance_id" >/dev/null
fi

# ---- 4. the resume --------------------------------------------------------------
wait_log "resumed $run at step [1-9][0-9]*" 2400 || fail "no resume within 40 min (log: $work/job.log)"
grep -E "resumed $run at step" "$work/job.log"
for _ in $(seq 120); do
  status="$(ray job status "$job_id" --address "$ADDRESS" 2>&1 | tail -n 1)"
  case "$status" in
    *SUCCEEDED*) echo "== resumed and finished: $status"; break ;;
    *FAILED*|*STOPPED*) fail "job ended: $status (log: $work/job.log)" ;;
  esac
  sleep 15
done
case "$status" in *SUCCEEDED*) ;; *) fail "job not finished after 30 min: $status" ;; esac

# ---- 5. NCCL over EFA on two p4d.24xlarge ------------------------------------------
if [ "$RUN_P4D" = 1 ]; then
  mkdir -p "$work/nccl"
  cat > "$work/nccl/allreduce.py" <<'EOF'
# Two Ray Train workers, one per p4d.24xlarge (8 GPUs each, so the autoscaler
# launches the 8-GPU type), all-reduce 256 MiB between the nodes.
import torch
import torch.distributed as dist
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer


def loop():
    x = torch.ones(64 * 1024 * 1024, device="cuda")
    for _ in range(20):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    assert x[0].item() == 2 ** 20, x[0].item()
    print("all-reduce ok")


TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=2, use_gpu=True,
                                                resources_per_worker={"GPU": 8, "CPU": 8},
                                                placement_strategy="STRICT_SPREAD")).fit()
EOF
  job_id="nccl-efa-$(date +%Y%m%d%H%M%S)"
  ray job submit --address "$ADDRESS" --submission-id "$job_id" --working-dir "$work/nccl" \
    --runtime-env-json '{"env_vars": {"NCCL_DEBUG": "INFO"}}' -- python allreduce.py
  ray job logs "$job_id" --address "$ADDRESS" > "$work/nccl.log" 2>&1
  grep -q "all-reduce ok" "$work/nccl.log" || fail "all-reduce did not finish (log: $work/nccl.log)"
  grep -q "NET/OFI" "$work/nccl.log" || fail "NCCL did not load aws-ofi-nccl (no NET/OFI; log: $work/nccl.log)"
  if grep -q "via NET/Socket" "$work/nccl.log"; then fail "NCCL fell back to sockets (log: $work/nccl.log)"; fi
  grep -m 3 "NET/OFI" "$work/nccl.log"
  echo "== NCCL over EFA: ok"
fi

echo "== spot-resume check passed"
