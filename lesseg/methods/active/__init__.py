"""Active domain adaptation: RIPU's scores, selection and losses (methods.md section 8)."""
