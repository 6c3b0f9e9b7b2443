"""The sinks' tests: plots, W&B, TensorBoard, the HTML report, background publishing."""
