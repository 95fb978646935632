"""hil_sim"""
