variable "region" {
  description = "AWS region of the bucket and the Ray nodes"
  type        = string
  default     = "us-east-1"
}

variable "bucket_name" {
  description = "S3 bucket for scan tables, runs, checkpoints and exported models (globally unique)"
  type        = string
}

variable "checkpoint_retention_days" {
  description = "Objects under runs/ (checkpoints, run state) expire after this many days; keep finished models under models/"
  type        = number
  default     = 120
}

variable "ssh_cidr" {
  description = "The operator network allowed to SSH to the Ray nodes (the only open port; the dashboard goes through the SSH tunnel)"
  type        = string
}

variable "eks_oidc_provider_arn" {
  description = "For KubeRay on EKS: the cluster's OIDC provider ARN (IRSA); empty to skip the pod role"
  type        = string
  default     = ""
}

variable "eks_namespace" {
  description = "Namespace of the fmrilm-ray service account (cluster/kuberay/serviceaccount.yaml)"
  type        = string
  default     = "fmrilm"
}
