# The fmrilm bucket: private, encrypted, versioned, TLS only. Nothing under datasets/ or runs/
# expires by age: an expiry there would remove a live run's checkpoints or the artifacts later
# stages read. Runs rotate their own checkpoints (run.keep_checkpoints) and superseded dataset
# versions go with `fmrilm data gc`; deleted and overwritten objects stay recoverable as
# noncurrent versions for noncurrent_retention_days; only scratch/ expires.
resource "aws_s3_bucket" "data" {
  bucket = var.bucket_name
}

resource "aws_s3_bucket_public_access_block" "data" {
  bucket                  = aws_s3_bucket.data.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "data" {
  bucket = aws_s3_bucket.data.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "data" {
  bucket = aws_s3_bucket.data.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "aws:kms"
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_versioning" "data" {
  bucket = aws_s3_bucket.data.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "data" {
  bucket     = aws_s3_bucket.data.id
  depends_on = [aws_s3_bucket_versioning.data]

  rule {
    id     = "expire-scratch"
    status = "Enabled"
    filter {
      prefix = "scratch/"
    }
    expiration {
      days = var.scratch_retention_days
    }
  }

  rule {
    id     = "recoverable-deletes-then-gone"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_retention_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }
}

data "aws_iam_policy_document" "tls_only" {
  statement {
    sid     = "DenyInsecureTransport"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [aws_s3_bucket.data.arn, "${aws_s3_bucket.data.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

data "aws_iam_policy_document" "bucket" {
  source_policy_documents = [data.aws_iam_policy_document.tls_only.json]
  statement {
    sid    = "NoIrrecoverableChangesByJobRoles"
    effect = "Deny"
    actions = ["s3:DeleteObjectVersion", "s3:DeleteBucket", "s3:PutBucketVersioning", "s3:PutLifecycleConfiguration",
    "s3:PutBucketPolicy", "s3:DeleteBucketPolicy", "s3:PutBucketAcl", "s3:PutObjectAcl"]
    resources = [aws_s3_bucket.data.arn, "${aws_s3_bucket.data.arn}/*"]
    principals {
      type        = "AWS"
      identifiers = concat([aws_iam_role.head.arn, aws_iam_role.worker.arn], aws_iam_role.kuberay[*].arn)
    }
  }
}

resource "aws_s3_bucket_policy" "data" {
  bucket = aws_s3_bucket.data.id
  policy = data.aws_iam_policy_document.bucket.json
}

resource "aws_ecr_repository" "image" {
  name                 = "fmrilm"
  image_tag_mutability = "IMMUTABLE"
  image_scanning_configuration {
    scan_on_push = true
  }
  encryption_configuration {
    encryption_type = "KMS"
  }
}

# The Ray cluster's auth token (RAY_AUTH_MODE=token): the nodes read it with their roles. Its value
# is set by the operator, never by terraform (so it is not in the state):
#   aws secretsmanager put-secret-value --secret-id fmrilm/ray-auth-token --secret-string "$(openssl rand -hex 32)"
resource "aws_secretsmanager_secret" "ray_auth_token" {
  name        = "fmrilm/ray-auth-token"
  description = "Token authentication of the fmrilm Ray cluster (cluster/aws.yaml setup_commands)"
}
