output "websocket_url" {
  description = "Give this to y-webrtc as a signaling server."
  value       = aws_apigatewayv2_stage.signaling.invoke_url
}

output "table_name" {
  description = "The subscriptions table."
  value       = aws_dynamodb_table.subscriptions.name
}

output "function_name" {
  value = aws_lambda_function.signaling.function_name
}
