"""The hospital's side: what runs at each hospital and nowhere else.

`client_app` (the ClientApp every transport uses, in simulation and deployment), `local_training`
and `training` (DP-SGD of the task encoders), `models` (the client models) and `baseline` (the
single-hospital baseline, trained on the same records out of the same budget)."""
