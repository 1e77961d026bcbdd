"""The app's health: probes, the port and process watch, the health state machine, the monitor."""
