# polysignal, serverless shape, as a Terraform module: the same resources as template.yaml (SAM),
# an API Gateway WebSocket API whose every route invokes one Lambda function, which keeps
# subscriptions in one DynamoDB table (docs/serverless.md, docs/deploy.md).
#
#   polysignal package-lambda --out dist/lambda.zip
#   module "signaling" {
#     source     = "./deploy/terraform"
#     lambda_zip = "${path.root}/dist/lambda.zip"
#   }
#
# tests/deploy/test_terraform.py checks the table, the routes and the function against
# template.yaml.

data "aws_partition" "current" {}
data "aws_region" "current" {}
data "aws_caller_identity" "current" {}

locals {
  # y-webrtc clients send no `action`, so every frame takes the $default route.
  route_keys = ["$connect", "$disconnect", "$default"]
}

# One item per (topic, connection); gs1 finds a connection's topics on disconnect; `ttl` expires
# subscriptions whose $disconnect never came (docs/serverless.md, "Table design").
resource "aws_dynamodb_table" "subscriptions" {
  name         = "${var.name}-subscriptions"
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "pk"
  range_key    = "sk"

  attribute {
    name = "pk"
    type = "S"
  }
  attribute {
    name = "sk"
    type = "S"
  }
  attribute {
    name = "data"
    type = "S"
  }

  global_secondary_index {
    name            = "gs1"
    hash_key        = "sk"
    range_key       = "data"
    projection_type = "ALL"
  }

  ttl {
    attribute_name = "ttl"
    enabled        = true
  }

  tags = var.tags
}

# --- the function and what it may do ----------------------------------------------------------

resource "aws_iam_role" "signaling" {
  name = "${var.name}-signaling"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "lambda.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
  tags = var.tags
}

resource "aws_iam_role_policy_attachment" "logs" {
  role       = aws_iam_role.signaling.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole"
}

resource "aws_iam_role_policy" "signaling" {
  name = "${var.name}-signaling"
  role = aws_iam_role.signaling.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        # SAM's DynamoDBCrudPolicy, on the table and its indexes.
        Effect = "Allow"
        Action = [
          "dynamodb:GetItem",
          "dynamodb:DeleteItem",
          "dynamodb:PutItem",
          "dynamodb:Scan",
          "dynamodb:Query",
          "dynamodb:UpdateItem",
          "dynamodb:BatchWriteItem",
          "dynamodb:BatchGetItem",
          "dynamodb:DescribeTable",
          "dynamodb:ConditionCheckItem",
        ]
        Resource = [
          aws_dynamodb_table.subscriptions.arn,
          "${aws_dynamodb_table.subscriptions.arn}/index/*",
        ]
      },
      {
        # Posting to (and closing) the API's connections: the sender of every delivery.
        Effect   = "Allow"
        Action   = "execute-api:ManageConnections"
        Resource = "arn:${data.aws_partition.current.partition}:execute-api:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:${aws_apigatewayv2_api.signaling.id}/${var.stage_name}/POST/@connections/*"
      },
    ]
  })
}

resource "aws_lambda_function" "signaling" {
  function_name    = "${var.name}-signaling"
  description      = "polysignal topics protocol for API Gateway WebSockets"
  role             = aws_iam_role.signaling.arn
  filename         = var.lambda_zip
  source_code_hash = filebase64sha256(var.lambda_zip)
  handler          = "polysignal.serverless.handler"
  runtime          = "python3.12"
  # The zip is pure Python, so any architecture runs it; Graviton costs less.
  architectures = ["arm64"]
  memory_size   = 512
  # API Gateway stops waiting for an integration after 29 s.
  timeout = 29

  environment {
    variables = {
      TABLE_NAME       = aws_dynamodb_table.subscriptions.name
      ECHO             = var.echo
      SUBSCRIPTION_TTL = tostring(var.subscription_ttl)
      LOG_LEVEL        = var.log_level
    }
  }

  tags = var.tags
}

# --- the WebSocket API ---------------------------------------------------------------------------

resource "aws_apigatewayv2_api" "signaling" {
  name                       = "${var.name}-signaling"
  protocol_type              = "WEBSOCKET"
  route_selection_expression = "$request.body.action"
  tags                       = var.tags
}

resource "aws_apigatewayv2_integration" "signaling" {
  api_id             = aws_apigatewayv2_api.signaling.id
  integration_type   = "AWS_PROXY"
  integration_method = "POST"
  integration_uri    = aws_lambda_function.signaling.invoke_arn
}

resource "aws_apigatewayv2_route" "signaling" {
  for_each           = toset(local.route_keys)
  api_id             = aws_apigatewayv2_api.signaling.id
  route_key          = each.value
  authorization_type = "NONE"
  target             = "integrations/${aws_apigatewayv2_integration.signaling.id}"
}

resource "aws_apigatewayv2_deployment" "signaling" {
  api_id = aws_apigatewayv2_api.signaling.id
  triggers = {
    redeployment = sha1(jsonencode([
      aws_apigatewayv2_integration.signaling.id,
      [for key in local.route_keys : aws_apigatewayv2_route.signaling[key].id],
    ]))
  }
  depends_on = [aws_apigatewayv2_route.signaling]
  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_apigatewayv2_stage" "signaling" {
  api_id        = aws_apigatewayv2_api.signaling.id
  name          = var.stage_name
  deployment_id = aws_apigatewayv2_deployment.signaling.id
  default_route_settings {
    throttling_rate_limit  = var.throttling_rate_limit
    throttling_burst_limit = var.throttling_burst_limit
  }
  tags = var.tags
}

resource "aws_lambda_permission" "api_gateway" {
  statement_id  = "AllowApiGatewayInvoke"
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.signaling.function_name
  principal     = "apigateway.amazonaws.com"
  source_arn    = "${aws_apigatewayv2_api.signaling.execution_arn}/*"
}
