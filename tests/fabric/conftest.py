"""Fabric tests: the helpers (`Fabric`, `running_lab`, `RouteMonitor`, ...) are in
`tests.fabric.harness`; each test module makes the labs it needs with `running_lab`."""
