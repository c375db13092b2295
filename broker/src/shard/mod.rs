//! Layer 3: the glommio runtime.
