//! Workspace root package: hosts examples/ and tests/.
