variable "name" {
  description = "Prefix of every resource's name (the SAM template uses the stack's name)."
  type        = string
  default     = "polysignal"
}

variable "lambda_zip" {
  description = "The deployment zip written by `polysignal package-lambda --out PATH`."
  type        = string
}

variable "stage_name" {
  description = "API Gateway stage, the last part of the wss:// URL."
  type        = string
  default     = "signaling"
}

variable "echo" {
  description = "\"1\": deliver a publish to its sender too (y-webrtc's reference server does)."
  type        = string
  default     = "0"
  validation {
    condition     = contains(["0", "1"], var.echo)
    error_message = "echo must be \"0\" or \"1\"."
  }
}

variable "subscription_ttl" {
  description = "Seconds a subscription outlives its connection's last activity."
  type        = number
  default     = 3600
  validation {
    condition     = var.subscription_ttl >= 60
    error_message = "subscription_ttl must be at least 60."
  }
}

variable "throttling_rate_limit" {
  description = "Messages per second the stage accepts (steady)."
  type        = number
  default     = 1000
}

variable "throttling_burst_limit" {
  description = "Messages the stage accepts at once."
  type        = number
  default     = 500
}

variable "log_level" {
  description = "LOG_LEVEL of the function."
  type        = string
  default     = "INFO"
}

variable "tags" {
  description = "Tags for every resource that takes them."
  type        = map(string)
  default     = {}
}
