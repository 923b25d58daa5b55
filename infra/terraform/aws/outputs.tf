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
