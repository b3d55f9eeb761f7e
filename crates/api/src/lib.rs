//! Control plane <-> proxy API: filled in with the control plane (issue 3). Proto types stop here.
