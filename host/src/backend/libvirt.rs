//! The libvirt backend (see issue 3).
