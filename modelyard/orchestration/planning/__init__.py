"""Where and when each model runs: device-memory estimates and the placement into waves."""
