variable "region" {
  description = "AWS region of the bucket and the Ray nodes"
  type        = string
  default     = "us-east-1"
}

variable "bucket_name" {
  description = "S3 bucket for scan tables, runs, checkpoints and exported models (globally unique)"
  type        = string
}

variable "scratch_retention_days" {
  description = "Objects under scratch/ expire after this many days (nothing else in the bucket expires by age)"
  type        = number
  default     = 14
}

variable "noncurrent_retention_days" {
  description = "Deleted or overwritten objects stay recoverable as noncurrent versions for this many days"
  type        = number
  default     = 30
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
