// Force-included after msl_shim.h in the strict pass only. The kernel source
// reaching clang is already preprocessed (user macros expanded), so every
// `double` or `virtual` the kernel author wrote is a token lexed from the
// file, where poison fires; the shim's own macros are exempt, since poison
// does not apply inside macro expansions. MSL has neither.
#pragma once
#pragma GCC poison double virtual
