# The Ray nodes' security group: SSH from the operator network only (the dashboard is reached
# through the SSH tunnel of `ray dashboard`); nodes talk to each other freely.
data "aws_vpc" "default" {
  default = true
}

resource "aws_security_group" "ray" {
  name        = "fmrilm-ray-nodes"
  description = "fmrilm Ray nodes: SSH from the operator, all traffic between nodes"
  vpc_id      = data.aws_vpc.default.id

  ingress {
    description = "SSH from the operator network"
    from_port   = 22
    to_port     = 22
    protocol    = "tcp"
    cidr_blocks = [var.ssh_cidr]
  }
  ingress {
    description = "Ray traffic between the nodes"
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    self        = true
  }
  egress {
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"]
  }
}
