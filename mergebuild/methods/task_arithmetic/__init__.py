"""The task-arithmetic family (TIES, DARE, breadcrumbs, DELLA…): whole-tensor and streamed."""
