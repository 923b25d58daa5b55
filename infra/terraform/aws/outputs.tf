output "bucket_name" {
  value = aws_s3_bucket.data.bucket
}

output "image_repository" {
  description = "docker.image in cluster/aws.yaml is <this>:<fmrilm version>"
  value       = aws_ecr_repository.image.repository_url
}

output "head_instance_profile" {
  value = aws_iam_instance_profile.head.name
}

output "worker_instance_profile" {
  value = aws_iam_instance_profile.worker.name
}

output "ray_security_group_id" {
  value = aws_security_group.ray.id
}

output "kuberay_role_arn" {
  description = "eks.amazonaws.com/role-arn of cluster/kuberay/serviceaccount.yaml"
  value       = var.eks_oidc_provider_arn == "" ? "" : aws_iam_role.kuberay[0].arn
}

output "ray_auth_token_secret" {
  description = "Secrets Manager id of the Ray auth token the nodes read (set its value with put-secret-value)"
  value       = aws_secretsmanager_secret.ray_auth_token.name
}
