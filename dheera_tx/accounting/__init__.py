"""
What a call costs and whether it may run: usage metering, admission against
budgets and limits, and the spend ledger.
"""
