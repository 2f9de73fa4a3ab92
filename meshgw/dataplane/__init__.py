"""The data plane: listeners, flows, the pumps that move bytes, the worker processes."""

# Every `--pump` mode the data plane offers, its default first. `meshgw bench` measures meshgw
# once per mode listed here: a new mode becomes a bench target by being added.
# docs/operations.md#pump-modes says what each does.
PUMP_MODES = ("auto", "splice", "userspace", "sockmap")
