"""Single-device model code: dense and mixture-of-experts decoder LMs. No networking imports."""
