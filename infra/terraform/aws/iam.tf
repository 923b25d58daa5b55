# Least privilege: workers read and write the fmrilm bucket, pull the image and read the Ray auth
# token; the head also launches and stops worker instances (the Ray autoscaler: only instances
# tagged ray-cluster-name=fmrilm, in this region and account) and may pass only the worker role.
# No role may delete object versions, the bucket, or change its versioning, lifecycle or policy
# (storage.tf denies those in the bucket policy too), so nothing a job does is irrecoverable.
data "aws_caller_identity" "current" {}

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "bucket_rw" {
  statement {
    sid       = "ListBucket"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = [aws_s3_bucket.data.arn]
  }
  statement {
    sid       = "ObjectsReadWrite"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]
    resources = ["${aws_s3_bucket.data.arn}/*"]
  }
  statement {
    sid       = "PullImage"
    actions   = ["ecr:GetAuthorizationToken"] # no resource-level permissions exist for this action
    resources = ["*"]
  }
  statement {
    sid       = "ReadRayAuthToken"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [aws_secretsmanager_secret.ray_auth_token.arn]
  }
  statement {
    sid       = "PullImageLayers"
    actions   = ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"]
    resources = [aws_ecr_repository.image.arn]
  }
}

locals {
  ec2_arn = "arn:aws:ec2:${var.region}:${data.aws_caller_identity.current.account_id}"
}

data "aws_iam_policy_document" "autoscaler" {
  statement {
    sid = "DescribeOnly" # Describe* calls have no resource-level permissions; they read, never change
    actions = ["ec2:DescribeInstances", "ec2:DescribeInstanceTypes", "ec2:DescribeImages", "ec2:DescribeSubnets",
    "ec2:DescribeSecurityGroups", "ec2:DescribeKeyPairs", "ec2:DescribeAvailabilityZones"]
    resources = ["*"]
  }
  statement {
    sid       = "LaunchOnlyTaggedWorkers"
    actions   = ["ec2:RunInstances"]
    resources = ["${local.ec2_arn}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/ray-cluster-name"
      values   = ["fmrilm"]
    }
  }
  statement {
    sid     = "LaunchWithTheseResources"
    actions = ["ec2:RunInstances"]
    resources = ["${local.ec2_arn}:volume/*", "${local.ec2_arn}:network-interface/*", "${local.ec2_arn}:subnet/*",
      "${local.ec2_arn}:security-group/*", "${local.ec2_arn}:key-pair/*", "arn:aws:ec2:${var.region}::image/*",
    "${local.ec2_arn}:launch-template/*"]
  }
  statement {
    sid       = "TagAtLaunch"
    actions   = ["ec2:CreateTags"]
    resources = ["${local.ec2_arn}:instance/*", "${local.ec2_arn}:volume/*"]
    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["RunInstances"]
    }
  }
  statement {
    sid       = "RetagOnlyOurWorkers"
    actions   = ["ec2:CreateTags"]
    resources = ["${local.ec2_arn}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "ec2:ResourceTag/ray-cluster-name"
      values   = ["fmrilm"]
    }
  }
  statement {
    sid       = "StopOnlyOurWorkers"
    actions   = ["ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"]
    resources = ["${local.ec2_arn}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "ec2:ResourceTag/ray-cluster-name"
      values   = ["fmrilm"]
    }
  }
  statement {
    sid       = "PassOnlyTheWorkerRole"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.worker.arn]
  }
}

resource "aws_iam_role" "worker" {
  name               = "fmrilm-ray-worker"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy" "worker_bucket" {
  name   = "fmrilm-bucket"
  role   = aws_iam_role.worker.id
  policy = data.aws_iam_policy_document.bucket_rw.json
}

resource "aws_iam_instance_profile" "worker" {
  name = "fmrilm-ray-worker"
  role = aws_iam_role.worker.name
}

resource "aws_iam_role" "head" {
  name               = "fmrilm-ray-head"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy" "head_bucket" {
  name   = "fmrilm-bucket"
  role   = aws_iam_role.head.id
  policy = data.aws_iam_policy_document.bucket_rw.json
}

resource "aws_iam_role_policy" "head_autoscaler" {
  name   = "fmrilm-autoscaler"
  role   = aws_iam_role.head.id
  policy = data.aws_iam_policy_document.autoscaler.json
}

resource "aws_iam_instance_profile" "head" {
  name = "fmrilm-ray-head"
  role = aws_iam_role.head.name
}

# KubeRay on EKS: the fmrilm-ray service account assumes this role (IRSA); bucket access only.
data "aws_iam_policy_document" "irsa_assume" {
  count = var.eks_oidc_provider_arn == "" ? 0 : 1
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.eks_oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${replace(var.eks_oidc_provider_arn, "/^.*oidc-provider\\//", "")}:sub"
      values   = ["system:serviceaccount:${var.eks_namespace}:fmrilm-ray"]
    }
  }
}

resource "aws_iam_role" "kuberay" {
  count              = var.eks_oidc_provider_arn == "" ? 0 : 1
  name               = "fmrilm-kuberay"
  assume_role_policy = data.aws_iam_policy_document.irsa_assume[0].json
}

resource "aws_iam_role_policy" "kuberay_bucket" {
  count  = var.eks_oidc_provider_arn == "" ? 0 : 1
  name   = "fmrilm-bucket"
  role   = aws_iam_role.kuberay[0].id
  policy = data.aws_iam_policy_document.bucket_rw.json
}
