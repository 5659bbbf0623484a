//! MSL-on-CPU harness (see issue 4).
